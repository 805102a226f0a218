//! `sovra put`, `get`, `search`, `erase` and `schema`: a customer's
//! fields through the `Vault` service.

use std::collections::HashMap;

use clap::Args;
use sovra_proto::vault::v1 as pb;
use sovra_vault::client::{self, Client};

use crate::common::{connect, CmdResult, Conn, Failure};

#[derive(Args)]
pub struct PutArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Customer id.
    #[arg(long)]
    pub customer: String,
    /// Collection channel.
    #[arg(long, default_value = "cli")]
    pub channel: String,
    /// Collector.
    #[arg(long, default_value = "sovra-cli")]
    pub collector: String,
    /// Consent reference.
    #[arg(long, default_value = "")]
    pub consent_ref: String,
    /// FIELD=VALUE pairs.
    #[arg(required = true)]
    pub fields: Vec<String>,
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Customer id.
    #[arg(long)]
    pub customer: String,
    /// Declared purpose (see `sovra schema`).
    #[arg(long)]
    pub purpose: String,
    /// Fields to read (all if none).
    pub fields: Vec<String>,
}

#[derive(Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Indexed field.
    #[arg(long)]
    pub field: String,
    /// Value to match (normalised like writes).
    #[arg(long)]
    pub value: String,
    /// Most ids to return.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Declared purpose of the search (one of the schema's purposes).
    #[arg(long)]
    pub purpose: String,
}

#[derive(Args)]
pub struct EraseArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Customer id.
    #[arg(long)]
    pub customer: String,
    /// Reason, e.g. gdpr_art17_request.
    #[arg(long)]
    pub reason: String,
}

/// A command-line value as the schema types the field.
fn parse_value(spec: &pb::FieldSpec, raw: &str) -> Result<pb::Value, Failure> {
    use pb::value::Kind;
    let kind = match spec.r#type.as_str() {
        "integer" => Kind::Integer(
            raw.trim()
                .parse()
                .map_err(|_| Failure::Usage(format!("field `{}` takes an integer", spec.name)))?,
        ),
        "timestamp" => Kind::TimestampMs(raw.trim().parse().map_err(|_| {
            Failure::Usage(format!(
                "field `{}` takes a timestamp in ms since the Unix epoch",
                spec.name
            ))
        })?),
        _ => Kind::Text(raw.to_owned()),
    };
    Ok(pb::Value { kind: Some(kind) })
}

/// The server's schema, by field name.
async fn schema_map(c: &mut Client) -> Result<HashMap<String, pb::FieldSpec>, Failure> {
    let s = c
        .describe_schema(pb::DescribeSchemaRequest {})
        .await?
        .into_inner();
    Ok(s.fields.into_iter().map(|f| (f.name.clone(), f)).collect())
}

/// `sovra put`: writes the fields, typed by the server's schema.
pub async fn put(a: PutArgs) -> CmdResult {
    let PutArgs {
        conn,
        customer,
        channel,
        collector,
        consent_ref,
        fields,
    } = a;
    let mut c = connect(&conn).await?;
    let specs = schema_map(&mut c).await?;
    let mut values = HashMap::new();
    for f in &fields {
        let (name, raw) = f
            .split_once('=')
            .ok_or_else(|| Failure::Usage(format!("`{f}`: expected FIELD=VALUE")))?;
        let spec = specs.get(name).ok_or_else(|| {
            Failure::Usage(format!("unknown field `{name}` (see `sovra schema`)"))
        })?;
        values.insert(name.to_owned(), parse_value(spec, raw)?);
    }
    let r = c
        .put_record(pb::PutRecordRequest {
            idempotency_key: String::new(),
            customer_id: customer,
            fields: values,
            source: Some(pb::CollectionSource {
                channel,
                collector,
                consent_ref,
            }),
        })
        .await?
        .into_inner();
    println!(
        "{} {}",
        if r.created { "created" } else { "updated" },
        r.customer_id
    );
    for v in r.versions {
        println!("  {} v{}", v.field, v.version);
    }
    Ok(())
}

/// `sovra get`: each field as the policies disclose it, with its source.
pub async fn get(a: GetArgs) -> CmdResult {
    let GetArgs {
        conn,
        customer,
        purpose,
        fields,
    } = a;
    let mut c = connect(&conn).await?;
    let r = c
        .get_fields(pb::GetFieldsRequest {
            customer_id: customer,
            fields,
            purpose,
        })
        .await?
        .into_inner();
    println!("customer {}", r.customer_id);
    for f in &r.fields {
        let src = f
            .source
            .as_ref()
            .map(|s| format!("{}/{}", s.channel, s.collector))
            .unwrap_or_default();
        println!(
            "  {:<20} v{:<3} {}   [{}]",
            f.field,
            f.version,
            client::display(f),
            src
        );
    }
    Ok(())
}

/// `sovra search`: the ids whose indexed field matches.
pub async fn search(a: SearchArgs) -> CmdResult {
    let SearchArgs {
        conn,
        field,
        value,
        limit,
        purpose,
    } = a;
    let mut c = connect(&conn).await?;
    let specs = schema_map(&mut c).await?;
    let spec = specs
        .get(&field)
        .ok_or_else(|| Failure::Usage(format!("unknown field `{field}` (see `sovra schema`)")))?;
    let v = parse_value(spec, &value)?;
    let r = c
        .search(pb::SearchRequest {
            field,
            value: Some(v),
            limit,
            purpose,
        })
        .await?
        .into_inner();
    for id in &r.customer_ids {
        println!("{id}");
    }
    if r.truncated {
        eprintln!("(more matches; raise --limit)");
    }
    Ok(())
}

/// `sovra erase`: crypto-shreds the customer and prints the receipt.
pub async fn erase(a: EraseArgs) -> CmdResult {
    let EraseArgs {
        conn,
        customer,
        reason,
    } = a;
    let mut c = connect(&conn).await?;
    let r = c
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: customer,
            reason,
        })
        .await?
        .into_inner();
    println!("erased {}: receipt {}", r.customer_id, r.receipt_id);
    println!(
        "  {} fields, {} index entries removed; data key (wrapped under v{}) destroyed",
        r.fields_erased, r.index_entries_removed, r.data_key_wrap_version
    );
    Ok(())
}

/// `sovra schema`: the fields and purposes the server declares.
pub async fn schema(conn: Conn) -> CmdResult {
    let mut c = connect(&conn).await?;
    let s = c
        .describe_schema(pb::DescribeSchemaRequest {})
        .await?
        .into_inner();
    println!("schema {} v{}", s.name, s.version);
    for f in &s.fields {
        println!(
            "  {:<20} {:<9} {:<9} {:<7} mask={:<7} {}",
            f.name,
            f.r#type,
            f.sensitivity,
            if f.indexed { "indexed" } else { "" },
            f.mask,
            f.description
        );
    }
    println!("purposes: {}", s.purposes.join(", "));
    Ok(())
}
