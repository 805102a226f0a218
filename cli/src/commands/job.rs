//! `sovra job`: sandbox jobs on encrypted features: submit, watch, fetch
//! the released result, cancel; the registered workloads.

use std::path::PathBuf;

use clap::Subcommand;
use sovra_proto::sandbox::v1 as spb;
use sovra_vault::client::SandboxClient;
use sovra_vault::jobs::view as job_view;

use crate::common::{connect_sandbox, read_file, CmdResult, Conn, Failure};

#[derive(Subcommand)]
pub enum JobCmd {
    /// Submit a job spec (TOML) or a registered workload, then watch it
    /// with a progress bar and print the released result.
    Submit {
        #[command(flatten)]
        conn: Conn,
        /// The job spec file (see docs/sandbox.md).
        #[arg(required_unless_present = "workload", conflicts_with = "workload")]
        spec: Option<PathBuf>,
        /// Run a registered workload instead (`sovra job workloads`).
        #[arg(long)]
        workload: Option<String>,
        /// Print the job id and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Follow a job with a progress bar until it ends.
    Watch {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        job_id: String,
    },
    /// Print a job's released result (submitter only).
    Result {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        job_id: String,
        /// Most per-customer rows to print.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Ask a running job to stop.
    Cancel {
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        job_id: String,
    },
    /// The registered guest workloads.
    Workloads {
        #[command(flatten)]
        conn: Conn,
    },
}

/// Runs a `sovra job` command.
pub async fn run(cmd: JobCmd) -> CmdResult {
    match cmd {
        JobCmd::Submit {
            conn,
            spec,
            workload,
            no_wait,
        } => submit(&conn, spec, workload, no_wait).await?,
        JobCmd::Watch { conn, job_id } => {
            let mut c = connect_sandbox(&conn).await?;
            let end = watch_job(&mut c, &job_id).await?;
            print!("{}", job_view::job(&end));
        }
        JobCmd::Result {
            conn,
            job_id,
            limit,
        } => {
            let r = connect_sandbox(&conn)
                .await?
                .get_result(spb::GetJobRequest { job_id })
                .await?
                .into_inner();
            if let Some(j) = &r.job {
                print!("{}", job_view::job(j));
            }
            print!("{}", job_view::result(&r, limit));
        }
        JobCmd::Cancel { conn, job_id } => {
            let j = connect_sandbox(&conn)
                .await?
                .cancel_job(spb::GetJobRequest { job_id })
                .await?
                .into_inner();
            print!("{}", job_view::job(&j));
        }
        JobCmd::Workloads { conn } => {
            let w = connect_sandbox(&conn)
                .await?
                .list_workloads(spb::ListWorkloadsRequest {})
                .await?
                .into_inner();
            for w in w.workloads {
                println!(
                    "{}  purpose {}, {} output, owned by {}\n  features: {}\n  spec sha256 {}\n  {}",
                    w.id,
                    w.purpose,
                    w.output_class,
                    w.department,
                    w.features.join(", "),
                    w.spec_sha256,
                    w.description
                );
            }
        }
    }
    Ok(())
}

/// `sovra job submit`: submits the spec or workload; unless `no_wait`,
/// follows it and prints the released result (a job that ends otherwise
/// is a failure).
async fn submit(
    conn: &Conn,
    spec: Option<PathBuf>,
    workload: Option<String>,
    no_wait: bool,
) -> CmdResult {
    let job = match (spec, workload) {
        (_, Some(id)) => spb::submit_job_request::Job::WorkloadId(id),
        (Some(path), None) => {
            let bytes = read_file(&path, sovra_sandbox::spec::MAX_SPEC_BYTES as u64)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| Failure::Usage(format!("{} is not UTF-8 text", path.display())))?;
            spb::submit_job_request::Job::SpecToml(text)
        }
        (None, None) => return Err(Failure::Usage("give a spec file or --workload ID".into())),
    };
    let mut c = connect_sandbox(conn).await?;
    let j = c
        .submit_job(spb::SubmitJobRequest { job: Some(job) })
        .await?
        .into_inner();
    print!("{}", job_view::job(&j));
    if no_wait {
        return Ok(());
    }
    let end = watch_job(&mut c, &j.job_id).await?;
    if end.state == spb::JobState::Succeeded as i32 {
        let r = c
            .get_result(spb::GetJobRequest {
                job_id: j.job_id.clone(),
            })
            .await?
            .into_inner();
        print!("{}", job_view::result(&r, 20));
        Ok(())
    } else {
        print!("{}", job_view::job(&end));
        Err(Failure::Usage(format!(
            "job {} ended {}",
            end.job_id,
            job_view::state(&end)
        )))
    }
}

/// Follows a job until it ends, drawing a progress bar on standard error.
async fn watch_job(c: &mut SandboxClient, job_id: &str) -> Result<spb::Job, Failure> {
    let mut stream = c
        .watch_job(spb::GetJobRequest {
            job_id: job_id.to_owned(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(j) = stream.message().await? {
        eprint!("\r{}", job_view::progress_line(&j));
        last = Some(j);
    }
    eprintln!();
    last.ok_or_else(|| Failure::Usage(format!("job `{job_id}`: the server sent no state")))
}
