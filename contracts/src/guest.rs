//! Guest code: WebAssembly run in `wasmi`, with fuel metering, a memory
//! cap and nothing of its own: no clock, no randomness, no I/O. The host
//! gives it the event's integer attributes and readable integer fields
//! through one import, and takes its actions through another.
//!
//! The guest interface (module `sovra`):
//! - import `attr(name_ptr: i32, name_len: i32) -> i64`: the integer
//!   attribute of the event, or readable integer field, named by the UTF-8
//!   bytes at `name_ptr`; `i64::MIN` when there is none (absent, or not an
//!   integer). `now_ms` and `at_ms` are attributes too: the host's time.
//! - import `emit(ptr: i32, len: i32)`: one action, as a JSON object of
//!   at most 4 KiB (`{"id": "alert", "kind": "notify", "to":
//!   "role:sales", "template": "lead_alert"}`); at most 16 per run. An
//!   action the contract's capabilities do not cover, or a malformed one,
//!   stops the run (`bad_action`).
//! - export `memory` and `run() -> i32`: 0 is success; anything else fails
//!   the run with that status.
//!
//! Guaranteed: a module that compiles here imports nothing else; a run
//! stops after its fuel (`fuel_exhausted`), at its memory cap
//! (`memory_cap`), or at a trap, with an error naming which, and never
//! affects the host beyond the time its fuel allows. Runs are
//! deterministic: the same module, inputs and fuel give the same result.

use std::collections::BTreeMap;

use wasmi::errors::{ErrorKind, FuelError, MemoryError};
use wasmi::{
    Caller, CompilationMode, Config, EnforcedLimits, Engine, Extern, Linker, Module, Store,
    StoreLimits, StoreLimitsBuilder, TrapCode,
};

use crate::condition::Scalar;
use crate::error::{GuestError, GuestFault};

/// Most actions one run may emit.
pub const MAX_EMITTED: usize = 16;
/// Longest emitted action (bytes of JSON).
pub const MAX_ACTION_LEN: usize = 4096;
/// The value `attr` returns for an absent or non-integer attribute.
pub const ABSENT: i64 = i64::MIN;

/// Bounds of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLimits {
    /// Fuel per run (about one unit per instruction).
    pub fuel: u64,
    /// Linear memory cap, in 64 KiB pages.
    pub memory_pages: u32,
}

impl GuestLimits {
    /// The most fuel a manifest may give a run.
    pub const MAX_FUEL: u64 = 100_000_000;
    /// The most memory a manifest may give a guest: 256 pages (16 MiB).
    pub const MAX_PAGES: u32 = 256;
}

impl Default for GuestLimits {
    fn default() -> Self {
        Self {
            fuel: 1_000_000,
            memory_pages: 1,
        }
    }
}

/// A compiled guest.
#[derive(Clone)]
pub struct Guest {
    engine: Engine,
    module: Module,
    wasm: Vec<u8>,
    limits: GuestLimits,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("wasm_len", &self.wasm.len())
            .field("limits", &self.limits)
            .finish()
    }
}

/// What a run gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The emitted actions, as JSON objects, in order.
    pub actions: Vec<serde_json::Value>,
    /// Fuel used.
    pub fuel_used: u64,
}

struct Host {
    limits: StoreLimits,
    attrs: BTreeMap<String, i64>,
    emitted: Vec<serde_json::Value>,
    fault: Option<GuestError>,
}

impl Guest {
    /// Compiles a module from WebAssembly text or binary and checks it
    /// against the guest interface (a trial instantiation, with its start
    /// function run under the same limits).
    pub fn compile(bytes: &[u8], limits: GuestLimits) -> Result<Guest, GuestError> {
        let wasm = wat::parse_bytes(bytes)
            .map_err(|e| GuestError::new(GuestFault::Invalid, format!("does not compile: {e}")))?
            .into_owned();
        let mut config = Config::default();
        config.consume_fuel(true);
        // Eager: every function is translated here, at registration. Lazy
        // translation would charge its fuel to the first run, and the same
        // run would use different fuel the first time and the next.
        config.compilation_mode(CompilationMode::Eager);
        // Bounds on what a module may declare (functions, globals, tables,
        // data): a hostile module cannot make its compilation expensive.
        config.enforced_limits(EnforcedLimits::strict());
        let engine = Engine::new(&config);
        let module = Module::new(&engine, &wasm)
            .map_err(|e| GuestError::new(GuestFault::Invalid, format!("does not validate: {e}")))?;
        for import in module.imports() {
            let known = import.module() == "sovra" && matches!(import.name(), "attr" | "emit");
            if !known {
                return Err(GuestError::new(
                    GuestFault::UnknownImport,
                    format!(
                        "imports `{:.64}.{:.64}`; the host provides only `sovra.attr` and `sovra.emit`",
                        import.module(),
                        import.name()
                    ),
                ));
            }
        }
        let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
        for want in ["run", "memory"] {
            if !exports.contains(&want) {
                return Err(GuestError::new(
                    GuestFault::Invalid,
                    format!(
                        "does not export `{want}` (a guest exports `memory` and `run() -> i32`)"
                    ),
                ));
            }
        }
        let guest = Guest {
            engine,
            module,
            wasm,
            limits,
        };
        // The trial: imports of the wrong type, a `run` of the wrong type, an
        // initial memory over the cap or a start function that traps are
        // found now, at registration, not at the first event.
        let (mut store, linker) = guest.store(BTreeMap::new())?;
        let instance = linker
            .instantiate_and_start(&mut store, &guest.module)
            .map_err(|e| classify(e, &store, limits.fuel))?;
        instance
            .get_typed_func::<(), i32>(&store, "run")
            .map_err(|e| {
                GuestError::new(
                    GuestFault::Invalid,
                    format!("`run` must be `() -> i32`: {e}"),
                )
            })?;
        match instance.get_export(&store, "memory") {
            Some(Extern::Memory(_)) => {}
            _ => {
                return Err(GuestError::new(
                    GuestFault::Invalid,
                    "`memory` must be the module's linear memory",
                ))
            }
        }
        Ok(guest)
    }

    /// The module's WebAssembly binary (what the contract's pin covers).
    pub fn wasm(&self) -> &[u8] {
        &self.wasm
    }

    /// Its limits.
    pub fn limits(&self) -> GuestLimits {
        self.limits
    }

    fn store(
        &self,
        attrs: BTreeMap<String, i64>,
    ) -> Result<(Store<Host>, Linker<Host>), GuestError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_pages as usize * 65_536)
            .memories(1)
            .tables(1)
            .table_elements(1024)
            .instances(1)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            Host {
                limits,
                attrs,
                emitted: Vec::new(),
                fault: None,
            },
        );
        store.limiter(|h| &mut h.limits);
        store
            .set_fuel(self.limits.fuel)
            .map_err(|e| GuestError::new(GuestFault::Invalid, format!("fuel: {e}")))?;
        let mut linker = Linker::<Host>::new(&self.engine);
        let wired = linker
            .func_wrap("sovra", "attr", host_attr)
            .and_then(|l| l.func_wrap("sovra", "emit", host_emit));
        if let Err(e) = wired {
            return Err(GuestError::new(
                GuestFault::Invalid,
                format!("host interface: {e}"),
            ));
        }
        Ok((store, linker))
    }

    /// Runs the guest on `inputs` (integer attributes and fields; strings
    /// and booleans are not visible to guests).
    pub fn run(&self, inputs: &BTreeMap<String, Scalar>) -> Result<Outcome, GuestError> {
        let attrs = inputs
            .iter()
            .filter_map(|(k, v)| match v {
                Scalar::Int(i) => Some((k.clone(), *i)),
                Scalar::Bool(_) | Scalar::Str(_) => None,
            })
            .collect();
        let (mut store, linker) = self.store(attrs)?;
        let fuel = self.limits.fuel;
        let instance = linker
            .instantiate_and_start(&mut store, &self.module)
            .map_err(|e| classify(e, &store, fuel))?;
        let run = instance
            .get_typed_func::<(), i32>(&store, "run")
            .map_err(|e| GuestError::new(GuestFault::Invalid, format!("`run`: {e}")))?;
        let status = run
            .call(&mut store, ())
            .map_err(|e| classify(e, &store, fuel))?;
        let fuel_used = used(&store, fuel);
        if status != 0 {
            return Err(
                GuestError::new(GuestFault::Failed, format!("`run` returned {status}"))
                    .with_fuel(fuel_used),
            );
        }
        Ok(Outcome {
            actions: std::mem::take(&mut store.data_mut().emitted),
            fuel_used,
        })
    }
}

fn used(store: &Store<Host>, fuel: u64) -> u64 {
    fuel.saturating_sub(store.get_fuel().unwrap_or(0))
}

/// Names why a run stopped.
fn classify(e: wasmi::Error, store: &Store<Host>, fuel: u64) -> GuestError {
    let fuel_used = used(store, fuel);
    if let Some(f) = &store.data().fault {
        return f.clone().with_fuel(fuel_used);
    }
    let fault = match e.kind() {
        ErrorKind::TrapCode(TrapCode::OutOfFuel)
        | ErrorKind::Fuel(FuelError::OutOfFuel { .. })
        | ErrorKind::Memory(MemoryError::OutOfFuel { .. }) => GuestFault::FuelExhausted,
        ErrorKind::TrapCode(TrapCode::GrowthOperationLimited)
        | ErrorKind::Memory(
            MemoryError::OutOfBoundsGrowth
            | MemoryError::ResourceLimiterDeniedAllocation
            | MemoryError::OutOfSystemMemory
            | MemoryError::MinimumSizeOverflow,
        ) => GuestFault::MemoryCap,
        ErrorKind::TrapCode(_) => GuestFault::Trap,
        _ => GuestFault::Invalid,
    };
    let message = match fault {
        GuestFault::FuelExhausted => {
            format!("ran out of fuel after {fuel_used} units (limit {fuel})")
        }
        GuestFault::MemoryCap => format!("asked for more memory than its cap: {e}"),
        _ => e.to_string(),
    };
    GuestError::new(fault, message).with_fuel(fuel_used)
}

/// Reads `len` bytes at `ptr` of the caller's memory, or records why not.
fn read_guest(
    caller: &Caller<'_, Host>,
    ptr: i32,
    len: i32,
    max: usize,
) -> Result<Vec<u8>, GuestError> {
    let (Ok(ptr), Ok(len)) = (usize::try_from(ptr), usize::try_from(len)) else {
        return Err(GuestError::new(
            GuestFault::Trap,
            "a negative pointer or length",
        ));
    };
    if len > max {
        return Err(GuestError::new(
            GuestFault::BadAction,
            format!("{len} bytes; at most {max}"),
        ));
    }
    let Some(Extern::Memory(mem)) = caller.get_export("memory") else {
        return Err(GuestError::new(GuestFault::Invalid, "no `memory` export"));
    };
    let mut buf = vec![0; len];
    mem.read(caller, ptr, &mut buf).map_err(|_| {
        GuestError::new(
            GuestFault::Trap,
            format!("bytes {ptr}..{} are out of memory", ptr + len),
        )
    })?;
    Ok(buf)
}

fn fail(caller: &mut Caller<'_, Host>, e: GuestError) -> wasmi::Error {
    let msg = e.to_string();
    caller.data_mut().fault = Some(e);
    wasmi::Error::new(msg)
}

fn host_attr(mut caller: Caller<'_, Host>, ptr: i32, len: i32) -> Result<i64, wasmi::Error> {
    match read_guest(&caller, ptr, len, 64) {
        Ok(name) => Ok(std::str::from_utf8(&name)
            .ok()
            .and_then(|n| caller.data().attrs.get(n).copied())
            .unwrap_or(ABSENT)),
        Err(e) => Err(fail(&mut caller, e)),
    }
}

fn host_emit(mut caller: Caller<'_, Host>, ptr: i32, len: i32) -> Result<(), wasmi::Error> {
    if caller.data().emitted.len() >= MAX_EMITTED {
        let e = GuestError::new(
            GuestFault::BadAction,
            format!("more than {MAX_EMITTED} actions in one run"),
        );
        return Err(fail(&mut caller, e));
    }
    let bytes = match read_guest(&caller, ptr, len, MAX_ACTION_LEN) {
        Ok(b) => b,
        Err(e) => return Err(fail(&mut caller, e)),
    };
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v @ serde_json::Value::Object(_)) => {
            caller.data_mut().emitted.push(v);
            Ok(())
        }
        _ => {
            let e = GuestError::new(
                GuestFault::BadAction,
                "an emitted action is not a JSON object",
            );
            Err(fail(&mut caller, e))
        }
    }
}
