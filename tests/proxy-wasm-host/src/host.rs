//! The test API: [`Host`] (a compiled module), [`Plugin`] (one VM with its root context),
//! [`Stream`] (one HTTP stream context).

use crate::abi::{Action, LogLevel, MapType, MetricType, Pairs, WasmResult};
use crate::imports;
use crate::state::{
    property_key, CallState, GrpcCall, HeaderChange, HostState, HttpCall, LocalReply, LogEntry,
    Shared, Slot, StreamState,
};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wasmtime::{Config, Engine, Func, Instance, Linker, Module, Store, Val};

// ---------------------------------------------------------------------------------------------
// Errors

/// The module could not be loaded.
#[derive(Debug, Clone)]
pub struct LoadError(pub String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoadError {}

/// The module trapped (a Rust panic is a trap on wasm32: `panic` holds its message).
#[derive(Debug, Clone)]
pub struct Trap {
    /// The export the host was calling, e.g. `proxy_on_request_headers`.
    pub function: String,
    /// The context it was called for.
    pub context_id: u32,
    /// The panic message (`src/x.rs:1:2: message`), from the SDK's panic hook (a critical log
    /// line) or from stderr.
    pub panic: Option<String>,
    /// wasmtime's description of the trap, with the wasm backtrace.
    pub detail: String,
}

impl fmt::Display for Trap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the wasm module trapped in {}(context {})",
            self.function, self.context_id
        )?;
        match &self.panic {
            Some(p) => write!(f, ": panicked at {p}"),
            None => write!(f, ": {}", self.detail),
        }
    }
}

impl std::error::Error for Trap {}

/// Where plugin start-up stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Instantiation failed (an import the host lacks, no memory, no allocator export).
    Instantiate,
    /// `_initialize` / `_start`, or `proxy_on_context_create` of the root context, trapped.
    Initialize,
    /// `proxy_on_vm_start` returned false or trapped.
    VmStart,
    /// `proxy_on_configure` returned false or trapped.
    Configure,
}

/// The plugin refused to start (Envoy would reject the configuration).
#[derive(Clone)]
pub struct Refused {
    pub stage: Stage,
    /// Everything the module logged up to the refusal.
    pub logs: Vec<LogEntry>,
    /// Set when the refusal is a trap rather than a `false`.
    pub trap: Option<Box<Trap>>,
    pub detail: Option<String>,
}

impl Refused {
    /// Whether some log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logs.iter().any(|l| l.message.contains(needle))
    }

    /// Log lines at `level` or above.
    pub fn logs_at_least(&self, level: LogLevel) -> Vec<String> {
        self.logs
            .iter()
            .filter(|l| l.level >= level)
            .map(|l| l.message.clone())
            .collect()
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the plugin refused to start at {:?}", self.stage)?;
        if let Some(t) = &self.trap {
            write!(f, " ({t})")?;
        }
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        for l in &self.logs {
            write!(f, "\n  {l}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Refused {}

impl fmt::Display for LogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{} ctx={}] {}",
            self.level, self.context_id, self.message
        )
    }
}

fn trap_panic(t: Trap) -> ! {
    panic!("{t}\n{}", t.detail)
}

// ---------------------------------------------------------------------------------------------
// Host

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Disable);
        // Tests run little code: compile fast (Cranelift in a dev build is slow) rather than well.
        config.cranelift_opt_level(wasmtime::OptLevel::None);
        Engine::new(&config).expect("a wasmtime engine")
    })
}

fn linker() -> &'static Linker<HostState> {
    static LINKER: OnceLock<Linker<HostState>> = OnceLock::new();
    LINKER.get_or_init(|| {
        let mut linker = Linker::new(engine());
        imports::add_to_linker(&mut linker).expect("host functions");
        linker
    })
}

/// Compiles a module once per process, and keeps the compiled code on disk (keyed by the
/// module's bytes and this wasmtime) so the next test binary skips Cranelift.
fn compile(bytes: &[u8]) -> Result<Module, LoadError> {
    static MODULES: OnceLock<Mutex<HashMap<u64, Module>>> = OnceLock::new();
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    env!("CARGO_PKG_VERSION").hash(&mut h);
    "wasmtime-48 opt-none".hash(&mut h);
    let key = h.finish();
    let modules = MODULES.get_or_init(Default::default);
    let mut modules = modules.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = modules.get(&key) {
        return Ok(m.clone());
    }
    let dir = std::env::var_os("PROXY_WASM_HOST_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("proxy-wasm-host-cache"));
    let file = dir.join(format!("{key:016x}.cwasm"));
    // SAFETY: the file is one this function wrote with `Module::serialize` for these bytes;
    // wasmtime checks that it was made by a compatible engine and refuses it otherwise.
    let cached = unsafe { Module::deserialize_file(engine(), &file) }.ok();
    let module = match cached {
        Some(m) => m,
        None => {
            let m = Module::new(engine(), bytes)
                .map_err(|e| LoadError(format!("compiling the module: {e:?}")))?;
            if let Ok(code) = m.serialize() {
                let _ = std::fs::create_dir_all(&dir);
                let tmp = dir.join(format!("{key:016x}.{}.tmp", std::process::id()));
                if std::fs::write(&tmp, code).is_ok() {
                    let _ = std::fs::rename(&tmp, &file);
                }
            }
            m
        }
    };
    modules.insert(key, module.clone());
    Ok(module)
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

/// A compiled proxy-wasm module, ready to start plugins (each one its own VM).
#[derive(Clone)]
pub struct Host {
    module: Module,
    shared: Shared,
    name: String,
}

impl Host {
    /// Loads and compiles a `.wasm` file (compiled code is cached; see the crate docs).
    pub fn load(path: impl AsRef<Path>) -> Result<Host, LoadError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| LoadError(format!("reading {}: {e}", path.display())))?;
        Host::from_bytes(&bytes, &path.display().to_string())
    }

    /// Compiles a module from its bytes (`name` appears in messages).
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Host, LoadError> {
        let module = compile(bytes)?;
        let exports: Vec<String> = module.exports().map(|e| e.name().to_string()).collect();
        if !exports.iter().any(|e| e == "proxy_abi_version_0_2_1") {
            return Err(LoadError(format!(
                "{name} does not export proxy_abi_version_0_2_1 (this host speaks ABI 0.2.1 only)"
            )));
        }
        for required in ["proxy_on_context_create", "memory"] {
            if !exports.iter().any(|e| e == required) {
                return Err(LoadError(format!("{name} does not export {required}")));
            }
        }
        if !exports
            .iter()
            .any(|e| e == "proxy_on_memory_allocate" || e == "malloc")
        {
            return Err(LoadError(format!(
                "{name} exports neither proxy_on_memory_allocate nor malloc"
            )));
        }
        Ok(Host {
            module,
            shared: Arc::new(Mutex::new(Default::default())),
            name: name.to_string(),
        })
    }

    /// The module's imports, as `(module, name)`.
    pub fn imports(&self) -> Vec<(String, String)> {
        self.module
            .imports()
            .map(|i| (i.module().to_string(), i.name().to_string()))
            .collect()
    }

    /// The module's exports.
    pub fn exports(&self) -> Vec<String> {
        self.module
            .exports()
            .map(|e| e.name().to_string())
            .collect()
    }

    /// Imports this host does not implement (calling one traps).
    pub fn missing_imports(&self) -> Vec<(String, String)> {
        let mut store = Store::new(
            engine(),
            HostState::new(0, String::new(), self.shared.clone()),
        );
        self.imports()
            .into_iter()
            .filter(|(m, n)| linker().get(&mut store, m, n).is_err())
            .collect()
    }

    /// Starts a plugin with this configuration and the defaults (see [`PluginBuilder`]).
    pub fn plugin(&self, configuration: impl AsRef<[u8]>) -> Result<Plugin, Refused> {
        self.plugin_builder().start(configuration)
    }

    /// A plugin with settings: VM configuration, properties, clusters, clock, ...
    pub fn plugin_builder(&self) -> PluginBuilder {
        PluginBuilder {
            host: self.clone(),
            vm_configuration: Vec::new(),
            properties: Vec::new(),
            clusters: None,
            log_level: LogLevel::Trace,
            time: None,
            seed: None,
            vm_id: String::new(),
            echo_logs: true,
            allow_stop_iteration: false,
            buffer_limit: 1024 * 1024,
        }
    }
}

/// Settings of a plugin before it starts.
pub struct PluginBuilder {
    host: Host,
    vm_configuration: Vec<u8>,
    properties: Vec<(Vec<u8>, Vec<u8>)>,
    clusters: Option<Vec<String>>,
    log_level: LogLevel,
    time: Option<SystemTime>,
    seed: Option<u64>,
    vm_id: String,
    echo_logs: bool,
    allow_stop_iteration: bool,
    buffer_limit: usize,
}

impl PluginBuilder {
    /// The VM configuration handed to `proxy_on_vm_start` (default: empty).
    pub fn vm_configuration(mut self, bytes: impl AsRef<[u8]>) -> Self {
        self.vm_configuration = bytes.as_ref().to_vec();
        self
    }

    /// A property every context of the plugin sees (raw bytes, Envoy's encoding).
    pub fn property(mut self, path: &[&str], value: impl AsRef<[u8]>) -> Self {
        self.properties
            .push((property_key(path), value.as_ref().to_vec()));
        self
    }

    pub fn property_str(self, path: &[&str], value: &str) -> Self {
        self.property(path, value.as_bytes())
    }

    /// An integer property: 8 bytes little-endian, as Envoy encodes ints.
    pub fn property_i64(self, path: &[&str], value: i64) -> Self {
        self.property(path, value.to_le_bytes())
    }

    /// A boolean property: one byte.
    pub fn property_bool(self, path: &[&str], value: bool) -> Self {
        self.property(path, [value as u8])
    }

    /// The clusters that exist. Without this every cluster exists; with it, a gRPC or HTTP
    /// call to another one fails with `BadArgument`, as in Envoy.
    pub fn clusters(mut self, names: &[&str]) -> Self {
        self.clusters = Some(names.iter().map(|s| s.to_string()).collect());
        self
    }

    /// What `proxy_get_log_level` answers (default: trace).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// The wall clock the module sees (default: 2025-01-01T00:00:00Z; it only moves when the
    /// test moves it).
    pub fn time(mut self, t: SystemTime) -> Self {
        self.time = Some(t);
        self
    }

    /// Seed of `random_get` (deterministic).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The vm_id (shared data and queues are per vm_id).
    pub fn vm_id(mut self, id: &str) -> Self {
        self.vm_id = id.to_string();
        self
    }

    /// Envoy's `allow_on_headers_stop_iteration` (default false): when false, a headers
    /// callback's `Pause` stops all iteration and the side's body waits, unseen, until the
    /// filter resumes ([`Action::Buffered`]); when true, body chunks still reach the filter.
    pub fn allow_on_headers_stop_iteration(mut self, allow: bool) -> Self {
        self.allow_stop_iteration = allow;
        self
    }

    /// Envoy's buffer limit in bytes (`per_connection_buffer_limit_bytes`, default 1 MiB, as
    /// Envoy's): a request body the filter has Envoy buffer (StopIterationAndBuffer) beyond it
    /// is refused with Envoy's `413`; under StopIterationAndWatermark it is only flow control.
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }

    /// Do not echo the module's logs and stdout/stderr to the test's output.
    pub fn quiet(mut self) -> Self {
        self.echo_logs = false;
        self
    }

    /// Starts the VM the way Envoy does: instantiate, `_initialize` (or `_start`), then
    /// `proxy_on_context_create(root, 0)`, `proxy_on_vm_start`, `proxy_on_configure`.
    pub fn start(self, configuration: impl AsRef<[u8]>) -> Result<Plugin, Refused> {
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let mut state = HostState::new(serial, self.vm_id.clone(), self.host.shared.clone());
        state.properties.extend(self.properties);
        state.clusters = self.clusters;
        state.log_level = self.log_level;
        state.echo_logs = self.echo_logs;
        state.allow_stop_iteration = self.allow_stop_iteration;
        state.buffer_limit = self.buffer_limit;
        if let Some(t) = self.time {
            state.time_ns = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        }
        if let Some(s) = self.seed {
            state.rng = s | 1;
        }
        let mut store = Store::new(engine(), state);
        let refused = |stage, store: &Store<HostState>, trap, detail| Refused {
            stage,
            logs: store.data().logs.clone(),
            trap,
            detail,
        };
        let instance = match linker().instantiate(&mut store, &self.host.module) {
            Ok(i) => i,
            Err(e) => {
                return Err(refused(
                    Stage::Instantiate,
                    &store,
                    None,
                    Some(format!("{e:?}")),
                ))
            }
        };
        let memory = instance.get_memory(&mut store, "memory");
        let malloc = instance
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<i32, i32>(&mut store, "malloc"))
            .ok();
        if memory.is_none() || malloc.is_none() {
            let detail = format!("{}: no memory or no allocator export", self.host.name);
            return Err(refused(Stage::Instantiate, &store, None, Some(detail)));
        }
        store.data_mut().memory = memory;
        store.data_mut().malloc = malloc;
        let mut vm = Vm {
            store,
            instance,
            trapped: None,
            funcs: HashMap::new(),
        };
        let init = if vm.func("_initialize").is_some() {
            "_initialize"
        } else {
            "_start"
        };
        if let Err(t) = vm.call(init, 0, &[]) {
            return Err(refused(
                Stage::Initialize,
                &vm.store,
                Some(Box::new(t)),
                None,
            ));
        }
        let root = vm.store.data_mut().alloc_context_id();
        vm.store.data_mut().root_id = root;
        vm.store.data_mut().contexts.insert(root, 0);
        if let Err(t) = vm.call("proxy_on_context_create", root, &[root as i32, 0]) {
            return Err(refused(
                Stage::Initialize,
                &vm.store,
                Some(Box::new(t)),
                None,
            ));
        }
        vm.store.data_mut().scope.vm_configuration = Some(self.vm_configuration.clone());
        let started = vm.call(
            "proxy_on_vm_start",
            root,
            &[root as i32, self.vm_configuration.len() as i32],
        );
        vm.store.data_mut().scope = Default::default();
        match started {
            Err(t) => return Err(refused(Stage::VmStart, &vm.store, Some(Box::new(t)), None)),
            Ok(Some(0)) => return Err(refused(Stage::VmStart, &vm.store, None, None)),
            Ok(_) => {}
        }
        let plugin = Plugin {
            vm: Rc::new(RefCell::new(vm)),
        };
        plugin.configure(configuration)?;
        Ok(plugin)
    }
}

// ---------------------------------------------------------------------------------------------
// The VM

struct Vm {
    store: Store<HostState>,
    instance: Instance,
    trapped: Option<Trap>,
    funcs: HashMap<&'static str, Option<Func>>,
}

impl Vm {
    fn func(&mut self, name: &'static str) -> Option<Func> {
        if let Some(f) = self.funcs.get(name) {
            return *f;
        }
        let f = self.instance.get_func(&mut self.store, name);
        self.funcs.insert(name, f);
        f
    }

    /// Calls an export for a context. `Ok(None)`: the export does not exist or returns nothing.
    fn call(
        &mut self,
        name: &'static str,
        context: u32,
        args: &[i32],
    ) -> Result<Option<i32>, Trap> {
        if let Some(t) = &self.trapped {
            let mut t = t.clone();
            t.detail = format!(
                "the VM is dead since an earlier trap in {}: {}",
                t.function, t.detail
            );
            return Err(t);
        }
        let Some(f) = self.func(name) else {
            return Ok(None);
        };
        let ty = f.ty(&self.store);
        let params: Vec<Val> = args.iter().map(|a| Val::I32(*a)).collect();
        if ty.params().len() != params.len() {
            let t = Trap {
                function: name.to_string(),
                context_id: context,
                panic: None,
                detail: format!(
                    "{name} takes {} parameters, the host passes {}",
                    ty.params().len(),
                    params.len()
                ),
            };
            self.trapped = Some(t.clone());
            return Err(t);
        }
        let mut results = vec![Val::I32(0); ty.results().len()];
        let (logs_before, stderr_before) = {
            let s = self.store.data_mut();
            s.effective = context;
            s.callback_context = context;
            (s.logs.len(), s.stderr.len())
        };
        let r = f.call(&mut self.store, &params, &mut results);
        {
            let s = self.store.data_mut();
            s.effective = 0;
            s.callback_context = 0;
        }
        match r {
            Ok(()) => Ok(results.first().and_then(|v| v.i32())),
            Err(e) => {
                let s = self.store.data();
                let from_log = s.logs[logs_before..]
                    .iter()
                    .rev()
                    .find(|l| l.level == LogLevel::Critical && l.message.contains("panicked at"))
                    .map(|l| l.message.clone());
                let stderr = String::from_utf8_lossy(&s.stderr[stderr_before..]).into_owned();
                let from_stderr = stderr.contains("panicked at").then_some(stderr);
                let panic = from_log.or(from_stderr).map(|m| clean_panic(&m));
                let t = Trap {
                    function: name.to_string(),
                    context_id: context,
                    panic,
                    detail: format!("{e:?}"),
                };
                self.trapped = Some(t.clone());
                Err(t)
            }
        }
    }

    /// Delivers `proxy_on_queue_ready` for queues this VM's root registered.
    fn pump(&mut self) -> Result<(), Trap> {
        for _ in 0..10_000 {
            let (serial, shared) = (self.store.data().serial, self.store.data().shared.clone());
            let next = {
                let mut shared = shared.lock().unwrap();
                shared
                    .queues
                    .iter_mut()
                    .enumerate()
                    .find(|(_, q)| q.owner.0 == serial && q.ready > 0)
                    .map(|(i, q)| {
                        q.ready -= 1;
                        (i as u32 + 1, q.owner.1)
                    })
            };
            let Some((queue, root)) = next else {
                return Ok(());
            };
            if self.store.data().contexts.contains_key(&root) {
                self.call("proxy_on_queue_ready", root, &[root as i32, queue as i32])?;
            }
        }
        Ok(())
    }

    /// A top-level call, then what Envoy does after it (deferred actions, queue notifications).
    fn run(&mut self, name: &'static str, context: u32, args: &[i32]) -> Result<Option<i32>, Trap> {
        self.pump()?;
        let r = self.call(name, context, args)?;
        self.after_call()?;
        self.pump()?;
        Ok(r)
    }

    fn stream(&mut self, id: u32) -> &mut StreamState {
        self.store
            .data_mut()
            .streams
            .get_mut(&id)
            .expect("stream state")
    }

    fn note(&mut self, id: u32, callback: String) {
        self.stream(id).callbacks.push(callback);
    }

    /// Envoy's after-VM-call actions: a local reply goes out through the encoder filters (this
    /// one included); a resumed side continues (its waiting body is delivered, or its buffered
    /// body forwarded).
    fn after_call(&mut self) -> Result<(), Trap> {
        loop {
            let ids: Vec<u32> = self.store.data().streams.keys().copied().collect();
            let mut progressed = false;
            for id in ids {
                if self.stream(id).deleted {
                    continue;
                }
                if self.stream(id).local_reply.is_some() && !self.stream(id).local_reply_done {
                    self.deliver_local_reply(id)?;
                    progressed = true;
                }
                for dir in [Dir::Request, Dir::Response] {
                    let side = dir.side(self.stream(id));
                    if !side.resume_pending {
                        continue;
                    }
                    side.resume_pending = false;
                    progressed = true;
                    if side.over {
                        continue;
                    }
                    if side.held {
                        side.held = false;
                        let body = side.waiting_body.take();
                        let eos = side.waiting_eos;
                        let trailers = side.waiting_trailers.take();
                        if let Some(body) = body {
                            self.deliver_body(id, dir, &body, eos)?;
                        }
                        if let Some(t) = trailers {
                            self.deliver_headers(id, dir, true, t, true)?;
                        }
                    } else {
                        side.forward();
                    }
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    fn deliver_local_reply(&mut self, id: u32) -> Result<(), Trap> {
        let s = self.stream(id);
        s.local_reply_done = true;
        s.request.over = true;
        s.request.held = false;
        s.request.waiting_body = None;
        s.request.waiting_trailers = None;
        let reply = s.local_reply.clone().expect("a local reply");
        if s.response.headers.map.is_some() {
            // The response had started: Envoy cannot replace it. Nothing more reaches the filter.
            s.response.over = true;
            s.callbacks
                .push("local reply after the response started: not delivered".into());
            return Ok(());
        }
        // Envoy's local reply: `:status`, the filter's headers, then content-length and a
        // text/plain content-type when there is a body and none was given.
        let mut headers: Pairs = vec![(":status".into(), reply.status.to_string().into_bytes())];
        headers.extend(
            reply
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone().into_bytes())),
        );
        if !reply.body.is_empty() {
            headers.push((
                "content-length".into(),
                reply.body.len().to_string().into_bytes(),
            ));
            if !headers.iter().any(|(k, _)| k == "content-type") {
                headers.push(("content-type".into(), b"text/plain".to_vec()));
            }
        }
        self.note(
            id,
            format!(
                "local reply {} delivered through the response callbacks",
                reply.status
            ),
        );
        let eos = reply.body.is_empty();
        self.deliver_headers(id, Dir::Response, false, headers, eos)?;
        if !eos && !self.stream(id).response.held {
            self.deliver_body(id, Dir::Response, &reply.body, true)?;
        }
        let s = self.stream(id);
        s.response.over = true;
        s.response.held = false;
        Ok(())
    }

    /// Delivers headers (or trailers) of one side to the filter.
    fn deliver_headers(
        &mut self,
        id: u32,
        dir: Dir,
        trailers: bool,
        map: Pairs,
        eos: bool,
    ) -> Result<Action, Trap> {
        let n = map.len() as i32;
        {
            let side = dir.side(self.stream(id));
            let slot = if trailers {
                &mut side.trailers
            } else {
                &mut side.headers
            };
            *slot = Slot {
                map: Some(map),
                live: true,
            };
        }
        let (name, args): (&'static str, Vec<i32>) = match (dir, trailers) {
            (Dir::Request, false) => ("proxy_on_request_headers", vec![id as i32, n, eos as i32]),
            (Dir::Request, true) => ("proxy_on_request_trailers", vec![id as i32, n]),
            (Dir::Response, false) => ("proxy_on_response_headers", vec![id as i32, n, eos as i32]),
            (Dir::Response, true) => ("proxy_on_response_trailers", vec![id as i32, n]),
        };
        let r = self.call(name, id, &args)?;
        let action = r
            .map(|v| Action::from_u32(v as u32))
            .unwrap_or(Action::Continue);
        self.note(id, format!("{name}({n}, eos={eos}) -> {action:?}"));
        let allow_stop = self.store.data().allow_stop_iteration;
        let side = dir.side(self.stream(id));
        if trailers && matches!(dir, Dir::Request) && action == Action::Continue {
            // The request goes on: what the filter had Envoy keep, then the trailers.
            side.forward();
        }
        let slot = if trailers {
            &mut side.trailers
        } else {
            &mut side.headers
        };
        match action {
            Action::Continue | Action::Other(2) => slot.live = false,
            // proxy-wasm-cpp-host turns StopIteration into StopAllIterationAndWatermark unless
            // the plugin allows StopIteration on headers.
            Action::Pause if allow_stop => {}
            _ if !trailers && !eos => side.held = true,
            _ => {}
        }
        self.after_call()?;
        Ok(action)
    }

    /// Delivers a body chunk of one side to the filter, as Envoy's Wasm filter does: after a
    /// `Pause` (StopIterationAndBuffer) the chunk joins what Envoy buffers and the filter sees
    /// all of it (a request beyond the buffer limit is refused with `413` first, without
    /// calling the filter); otherwise it sees only this chunk, and what it had Envoy keep
    /// (StopIterationAndWatermark) stays out of its view.
    fn deliver_body(&mut self, id: u32, dir: Dir, chunk: &[u8], eos: bool) -> Result<Action, Trap> {
        let limit = self.store.data().buffer_limit;
        let (len, too_large) = {
            let side = dir.side(self.stream(id));
            let buf = side.body.get_or_insert_with(Vec::new);
            buf.extend_from_slice(chunk);
            let len = buf.len();
            (
                len,
                side.buffering && matches!(dir, Dir::Request) && len > limit,
            )
        };
        if too_large {
            self.note(
                id,
                format!("request body of {len} bytes over the buffer limit: 413"),
            );
            self.stream(id).local_reply = Some(crate::state::LocalReply {
                status: 413,
                details: "request_payload_too_large".into(),
                body: b"Payload Too Large".to_vec(),
                headers: Vec::new(),
                grpc_status: -1,
            });
            self.after_call()?;
            return Ok(Action::NotCalled);
        }
        let name = match dir {
            Dir::Request => "proxy_on_request_body",
            Dir::Response => "proxy_on_response_body",
        };
        let r = self.call(name, id, &[id as i32, len as i32, eos as i32])?;
        let action = r
            .map(|v| Action::from_u32(v as u32))
            .unwrap_or(Action::Continue);
        self.note(id, format!("{name}({len}, eos={eos}) -> {action:?}"));
        let side = dir.side(self.stream(id));
        side.buffering = false;
        match action {
            Action::Continue => side.forward(),
            // StopIterationNoBuffer: the filter took the data; nothing is kept.
            Action::Other(3) => {
                if let Some(b) = side.body.as_mut() {
                    b.clear();
                }
            }
            // StopIterationAndWatermark: Envoy keeps the data (flow control, no limit) and the
            // next call sees only what comes after.
            Action::Other(2) => {
                if let Some(b) = side.body.as_mut() {
                    side.kept.append(b);
                }
            }
            // StopIterationAndBuffer: the next call sees everything Envoy keeps.
            _ => {
                let mut all = std::mem::take(&mut side.kept);
                if let Some(b) = side.body.as_mut() {
                    all.append(b);
                }
                side.body = Some(all);
                side.buffering = true;
            }
        }
        self.after_call()?;
        Ok(action)
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Request,
    Response,
}

impl Dir {
    fn side(self, s: &mut StreamState) -> &mut crate::state::Side {
        match self {
            Dir::Request => &mut s.request,
            Dir::Response => &mut s.response,
        }
    }
}

/// `panicked at src/x.rs:1:2:\nmessage\nnote: ...` → `src/x.rs:1:2: message`.
fn clean_panic(m: &str) -> String {
    let start = m
        .find("panicked at ")
        .map(|i| i + "panicked at ".len())
        .unwrap_or(0);
    let text = &m[start..];
    let text = text.split("\nnote: run with").next().unwrap_or(text);
    text.trim().replacen(":\n", ": ", 1)
}

// ---------------------------------------------------------------------------------------------
// Plugin

/// One VM running the module, with its root context (context id 1). Cheap to clone (shared).
#[derive(Clone)]
pub struct Plugin {
    vm: Rc<RefCell<Vm>>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vm = self.vm.borrow();
        let s = vm.store.data();
        f.debug_struct("Plugin")
            .field("root_context_id", &s.root_id)
            .field("streams", &s.streams.keys().collect::<Vec<_>>())
            .field("trapped", &vm.trapped.as_ref().map(|t| t.to_string()))
            .finish()
    }
}

fn pairs_of(headers: &[(&str, &str)]) -> Pairs {
    headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
        .collect()
}

fn raw_pairs_of(headers: &[(&str, &[u8])]) -> Pairs {
    headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_vec()))
        .collect()
}

fn strings(pairs: &Pairs) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

impl Plugin {
    fn state<R>(&self, f: impl FnOnce(&HostState) -> R) -> R {
        f(self.vm.borrow().store.data())
    }

    fn state_mut<R>(&self, f: impl FnOnce(&mut HostState) -> R) -> R {
        f(self.vm.borrow_mut().store.data_mut())
    }

    /// The root context's id (1).
    pub fn root_context_id(&self) -> u32 {
        self.state(|s| s.root_id)
    }

    /// Hands the root context a new plugin configuration (`proxy_on_configure`).
    pub fn configure(&self, configuration: impl AsRef<[u8]>) -> Result<(), Refused> {
        let config = configuration.as_ref().to_vec();
        let mut vm = self.vm.borrow_mut();
        let root = vm.store.data().root_id;
        let len = config.len() as i32;
        vm.store.data_mut().scope.plugin_configuration = Some(config);
        let r = vm.run("proxy_on_configure", root, &[root as i32, len]);
        vm.store.data_mut().scope = Default::default();
        let logs = vm.store.data().logs.clone();
        match r {
            Err(t) => Err(Refused {
                stage: Stage::Configure,
                logs,
                trap: Some(Box::new(t)),
                detail: None,
            }),
            Ok(Some(0)) => Err(Refused {
                stage: Stage::Configure,
                logs,
                trap: None,
                detail: None,
            }),
            Ok(_) => Ok(()),
        }
    }

    /// Opens an HTTP stream: a new context id, `proxy_on_context_create(id, root)`.
    pub fn http_stream(&self) -> Stream {
        self.try_http_stream().unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_http_stream(&self) -> Result<Stream, Trap> {
        let mut vm = self.vm.borrow_mut();
        let (id, root) = {
            let s = vm.store.data_mut();
            let id = s.alloc_context_id();
            s.contexts.insert(id, s.root_id);
            s.streams.insert(id, StreamState::default());
            (id, s.root_id)
        };
        vm.run("proxy_on_context_create", id, &[id as i32, root as i32])?;
        Ok(Stream {
            vm: self.vm.clone(),
            id,
        })
    }

    /// The tick period the module asked for (`None`: it asked for none).
    pub fn tick_period(&self) -> Option<Duration> {
        self.state(|s| {
            (s.tick_period_ms > 0).then(|| Duration::from_millis(s.tick_period_ms as u64))
        })
    }

    /// One `proxy_on_tick` of the root context. Panics when the module set no tick period
    /// (Envoy would never tick it): use [`Plugin::force_tick`] for that.
    pub fn tick(&self) {
        self.try_tick().unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_tick(&self) -> Result<(), Trap> {
        assert!(
            self.tick_period().is_some(),
            "the plugin set no tick period: Envoy would never call proxy_on_tick"
        );
        self.try_force_tick()
    }

    /// `proxy_on_tick` even without a tick period.
    pub fn force_tick(&self) {
        self.try_force_tick().unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_force_tick(&self) -> Result<(), Trap> {
        let mut vm = self.vm.borrow_mut();
        let root = vm.store.data().root_id;
        vm.run("proxy_on_tick", root, &[root as i32]).map(|_| ())
    }

    // --- gRPC ---------------------------------------------------------------------------------

    /// Every gRPC call and stream the module made, in token order, whatever their state.
    pub fn grpc_calls(&self) -> Vec<GrpcCall> {
        self.state(|s| s.grpc_calls.values().cloned().collect())
    }

    /// The gRPC calls (and streams) not yet answered, cancelled or closed.
    pub fn pending_grpc_calls(&self) -> Vec<GrpcCall> {
        self.state(|s| {
            s.grpc_calls
                .values()
                .filter(|c| c.state == CallState::Pending)
                .cloned()
                .collect()
        })
    }

    /// One call by token; panics when there is none.
    pub fn grpc_call(&self, token: u32) -> GrpcCall {
        self.state(|s| s.grpc_calls.get(&token).cloned())
            .unwrap_or_else(|| panic!("the module made no gRPC call with token {token}"))
    }

    fn pending_call(&self, token: u32) -> GrpcCall {
        let call = self.grpc_call(token);
        assert!(
            call.state == CallState::Pending,
            "gRPC call {token} ({}) is not pending: {:?}",
            call.full_method(),
            call.state
        );
        call
    }

    /// Answers a unary call with a message, as Envoy does on success: `proxy_on_grpc_receive`
    /// with the bytes in the gRPC receive buffer (no `proxy_on_grpc_close`).
    pub fn reply_grpc(&self, token: u32, message: impl AsRef<[u8]>) {
        self.try_reply_grpc(token, message)
            .unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_reply_grpc(&self, token: u32, message: impl AsRef<[u8]>) -> Result<(), Trap> {
        let call = self.pending_call(token);
        let message = message.as_ref().to_vec();
        let mut vm = self.vm.borrow_mut();
        let len = message.len() as i32;
        {
            let s = vm.store.data_mut();
            if !call.is_stream {
                s.grpc_calls.get_mut(&token).unwrap().state = CallState::Answered;
            }
            s.scope.grpc_receive = Some(message);
            s.status = (0, String::new());
        }
        // Envoy delivers the reply to the root context the call belongs to, whichever context
        // dispatched it (and even if that stream is gone).
        let root = call.root_context_id;
        let r = vm.run(
            "proxy_on_grpc_receive",
            root,
            &[root as i32, token as i32, len],
        );
        vm.store.data_mut().scope = Default::default();
        r.map(|_| ())
    }

    /// Answers with an encoded protobuf message.
    pub fn reply_grpc_message<M: prost::Message>(&self, token: u32, message: &M) {
        self.reply_grpc(token, message.encode_to_vec())
    }

    pub fn try_reply_grpc_message<M: prost::Message>(
        &self,
        token: u32,
        message: &M,
    ) -> Result<(), Trap> {
        self.try_reply_grpc(token, message.encode_to_vec())
    }

    /// Fails a call with a gRPC status (non-zero) and message, as Envoy does on failure:
    /// `proxy_on_grpc_close(context, token, status)`; `proxy_get_status` returns both.
    pub fn fail_grpc(&self, token: u32, status: u32, message: &str) {
        self.try_fail_grpc(token, status, message)
            .unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_fail_grpc(&self, token: u32, status: u32, message: &str) -> Result<(), Trap> {
        let call = self.pending_call(token);
        let mut vm = self.vm.borrow_mut();
        {
            let s = vm.store.data_mut();
            s.grpc_calls.get_mut(&token).unwrap().state = if status == 0 {
                CallState::Answered
            } else {
                CallState::Failed(status)
            };
            s.status = (status, message.to_string());
        }
        let root = call.root_context_id;
        let r = vm.run(
            "proxy_on_grpc_close",
            root,
            &[root as i32, token as i32, status as i32],
        );
        vm.store.data_mut().status = (0, String::new());
        r.map(|_| ())
    }

    /// The call's deadline passed: `DEADLINE_EXCEEDED` (4), as Envoy reports a timeout.
    pub fn timeout_grpc(&self, token: u32) {
        self.fail_grpc(
            token,
            crate::abi::grpc_status::DEADLINE_EXCEEDED,
            "Request timeout",
        )
    }

    pub fn try_timeout_grpc(&self, token: u32) -> Result<(), Trap> {
        self.try_fail_grpc(
            token,
            crate::abi::grpc_status::DEADLINE_EXCEEDED,
            "Request timeout",
        )
    }

    /// Initial metadata on a gRPC stream (`proxy_on_grpc_receive_initial_metadata`).
    pub fn grpc_stream_initial_metadata(&self, token: u32, metadata: &[(&str, &str)]) {
        self.grpc_metadata(token, metadata, true)
            .unwrap_or_else(|t| trap_panic(t))
    }

    /// Trailing metadata on a gRPC stream (`proxy_on_grpc_receive_trailing_metadata`).
    pub fn grpc_stream_trailing_metadata(&self, token: u32, metadata: &[(&str, &str)]) {
        self.grpc_metadata(token, metadata, false)
            .unwrap_or_else(|t| trap_panic(t))
    }

    fn grpc_metadata(
        &self,
        token: u32,
        metadata: &[(&str, &str)],
        initial: bool,
    ) -> Result<(), Trap> {
        let call = self.pending_call(token);
        let map = pairs_of(metadata);
        let n = map.len() as i32;
        let mut vm = self.vm.borrow_mut();
        let name = if initial {
            vm.store.data_mut().scope.grpc_initial_metadata = Some(map);
            "proxy_on_grpc_receive_initial_metadata"
        } else {
            vm.store.data_mut().scope.grpc_trailing_metadata = Some(map);
            "proxy_on_grpc_receive_trailing_metadata"
        };
        let root = call.root_context_id;
        let r = vm.run(name, root, &[root as i32, token as i32, n]);
        vm.store.data_mut().scope = Default::default();
        r.map(|_| ())
    }

    /// A message on a gRPC stream (`proxy_on_grpc_receive`; the stream stays open).
    pub fn grpc_stream_message(&self, token: u32, message: impl AsRef<[u8]>) {
        self.try_reply_grpc(token, message)
            .unwrap_or_else(|t| trap_panic(t))
    }

    /// Closes a gRPC stream from the remote side (`proxy_on_grpc_close`).
    pub fn grpc_stream_close(&self, token: u32, status: u32, message: &str) {
        self.fail_grpc(token, status, message)
    }

    /// Makes every following `proxy_grpc_call`/`proxy_http_call` fail with this status (e.g.
    /// `InternalFailure`), or lets them through again with `None`.
    pub fn set_dispatch_failure(&self, status: Option<WasmResult>) {
        self.state_mut(|s| s.dispatch_failure = status)
    }

    // --- HTTP calls ---------------------------------------------------------------------------

    pub fn http_calls(&self) -> Vec<HttpCall> {
        self.state(|s| s.http_calls.values().cloned().collect())
    }

    pub fn pending_http_calls(&self) -> Vec<HttpCall> {
        self.state(|s| {
            s.http_calls
                .values()
                .filter(|c| c.state == CallState::Pending)
                .cloned()
                .collect()
        })
    }

    /// Answers an HTTP call: `proxy_on_http_call_response` with the headers, body and trailers.
    pub fn reply_http(
        &self,
        token: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        trailers: &[(&str, &str)],
    ) {
        self.try_reply_http(token, headers, body, trailers)
            .unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_reply_http(
        &self,
        token: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        trailers: &[(&str, &str)],
    ) -> Result<(), Trap> {
        self.http_response(
            token,
            Some((pairs_of(headers), body.to_vec(), pairs_of(trailers))),
        )
    }

    /// The HTTP call failed (reset, timeout): Envoy calls back with nothing.
    pub fn fail_http(&self, token: u32) {
        self.http_response(token, None)
            .unwrap_or_else(|t| trap_panic(t))
    }

    fn http_response(
        &self,
        token: u32,
        response: Option<(Pairs, Vec<u8>, Pairs)>,
    ) -> Result<(), Trap> {
        let call = self
            .state(|s| s.http_calls.get(&token).cloned())
            .unwrap_or_else(|| panic!("the module made no HTTP call with token {token}"));
        assert!(
            call.state == CallState::Pending,
            "HTTP call {token} is not pending: {:?}",
            call.state
        );
        let mut vm = self.vm.borrow_mut();
        let (nh, nb, nt) = {
            let s = vm.store.data_mut();
            let c = s.http_calls.get_mut(&token).unwrap();
            match response {
                Some((h, b, t)) => {
                    c.state = CallState::Answered;
                    let sizes = (h.len(), b.len(), t.len());
                    s.scope.http_call_headers = Some(h);
                    s.scope.http_call_body = Some(b);
                    s.scope.http_call_trailers = Some(t);
                    sizes
                }
                None => {
                    c.state = CallState::Failed(0);
                    (0, 0, 0)
                }
            }
        };
        // Delivered to the root context the call belongs to, as Envoy does.
        let root = call.root_context_id;
        let r = vm.run(
            "proxy_on_http_call_response",
            root,
            &[root as i32, token as i32, nh as i32, nb as i32, nt as i32],
        );
        vm.store.data_mut().scope = Default::default();
        r.map(|_| ())
    }

    // --- metrics, logs, output ------------------------------------------------------------------

    /// A counter's or gauge's value by the name the module defined it with.
    pub fn metric(&self, name: &str) -> Option<u64> {
        self.state(|s| {
            s.metrics
                .iter()
                .find(|m| m.name == name && m.kind != MetricType::Histogram)
                .map(|m| m.value)
        })
    }

    /// Every counter and gauge, by name.
    pub fn metrics(&self) -> BTreeMap<String, u64> {
        self.state(|s| {
            s.metrics
                .iter()
                .filter(|m| m.kind != MetricType::Histogram)
                .map(|m| (m.name.clone(), m.value))
                .collect()
        })
    }

    /// The values recorded in a histogram.
    pub fn histogram(&self, name: &str) -> Vec<u64> {
        self.state(|s| {
            s.metrics
                .iter()
                .find(|m| m.name == name && m.kind == MetricType::Histogram)
                .map(|m| m.recorded.clone())
                .unwrap_or_default()
        })
    }

    /// Everything the module logged, in order.
    pub fn logs(&self) -> Vec<LogEntry> {
        self.state(|s| s.logs.clone())
    }

    /// Whether some log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.state(|s| s.logs.iter().any(|l| l.message.contains(needle)))
    }

    /// Log lines at `level` or above.
    pub fn logs_at_least(&self, level: LogLevel) -> Vec<String> {
        self.state(|s| {
            s.logs
                .iter()
                .filter(|l| l.level >= level)
                .map(|l| l.message.clone())
                .collect()
        })
    }

    /// What the module wrote to stdout / stderr (WASI `fd_write`).
    pub fn stdout(&self) -> String {
        self.state(|s| String::from_utf8_lossy(&s.stdout).into_owned())
    }

    pub fn stderr(&self) -> String {
        self.state(|s| String::from_utf8_lossy(&s.stderr).into_owned())
    }

    /// The trap that killed this VM, if one did.
    pub fn trap(&self) -> Option<Trap> {
        self.vm.borrow().trapped.clone()
    }

    // --- clock, properties, shared data ---------------------------------------------------------

    /// The module's wall clock.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.state(|s| s.time_ns))
    }

    pub fn set_time(&self, t: SystemTime) {
        self.state_mut(|s| {
            s.time_ns = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
        })
    }

    /// Moves the wall and monotonic clocks forward (ticks are not delivered: call `tick`).
    pub fn advance_time(&self, d: Duration) {
        self.state_mut(|s| {
            s.time_ns += d.as_nanos() as u64;
            s.monotonic_ns += d.as_nanos() as u64;
        })
    }

    /// A property every context sees (a stream's own properties win).
    pub fn set_property(&self, path: &[&str], value: impl AsRef<[u8]>) {
        let value = value.as_ref().to_vec();
        self.state_mut(|s| s.properties.insert(property_key(path), value));
    }

    pub fn set_property_str(&self, path: &[&str], value: &str) {
        self.set_property(path, value.as_bytes())
    }

    pub fn set_property_i64(&self, path: &[&str], value: i64) {
        self.set_property(path, value.to_le_bytes())
    }

    pub fn set_property_bool(&self, path: &[&str], value: bool) {
        self.set_property(path, [value as u8])
    }

    /// A property the root context set with `proxy_set_property`.
    pub fn module_property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.state(|s| s.module_properties.get(&property_key(path)).cloned())
    }

    /// Shared data (value, cas) of this plugin's vm_id.
    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.state(|s| {
            s.shared
                .lock()
                .unwrap()
                .data
                .get(&(s.vm_id.clone(), key.to_string()))
                .cloned()
        })
    }

    pub fn set_shared_data(&self, key: &str, value: impl AsRef<[u8]>) {
        let value = value.as_ref().to_vec();
        self.state(|s| {
            let mut shared = s.shared.lock().unwrap();
            let e = shared
                .data
                .entry((s.vm_id.clone(), key.to_string()))
                .or_insert((Vec::new(), 0));
            e.0 = value;
            e.1 += 1;
        })
    }

    /// Delivers pending `proxy_on_queue_ready` notifications (done after every call anyway).
    pub fn deliver_queue_ready(&self) {
        self.vm
            .borrow_mut()
            .pump()
            .unwrap_or_else(|t| trap_panic(t))
    }

    /// Contexts that called `proxy_done`.
    pub fn done_calls(&self) -> Vec<u32> {
        self.state(|s| s.done_calls.clone())
    }

    /// Every successful `proxy_set_effective_context`, in order: (the context whose callback
    /// ran, the context it made effective).
    pub fn effective_context_switches(&self) -> Vec<(u32, u32)> {
        self.state(|s| s.effective_switches.clone())
    }

    /// Ends the plugin: `proxy_on_done(root)`; when it answers true, `proxy_on_delete(root)`.
    /// Returns what `proxy_on_done` answered (false: the module calls `proxy_done` later).
    pub fn shutdown(&self) -> bool {
        self.try_shutdown().unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_shutdown(&self) -> Result<bool, Trap> {
        let mut vm = self.vm.borrow_mut();
        let root = vm.store.data().root_id;
        let done = vm.run("proxy_on_done", root, &[root as i32])?.unwrap_or(1) != 0;
        if done {
            vm.run("proxy_on_delete", root, &[root as i32])?;
            let s = vm.store.data_mut();
            s.contexts.remove(&root);
            // Envoy cancels a root context's outstanding calls when it goes.
            for c in s
                .grpc_calls
                .values_mut()
                .filter(|c| c.root_context_id == root && c.state == CallState::Pending)
            {
                c.state = CallState::CancelledByHost;
            }
            for c in s
                .http_calls
                .values_mut()
                .filter(|c| c.root_context_id == root && c.state == CallState::Pending)
            {
                c.state = CallState::CancelledByHost;
            }
        }
        Ok(done)
    }
}

// ---------------------------------------------------------------------------------------------
// Stream

/// One HTTP stream (an HTTP context of the plugin). Cheap to clone (shared).
#[derive(Clone)]
pub struct Stream {
    vm: Rc<RefCell<Vm>>,
    id: u32,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .field("callbacks", &self.callbacks())
            .finish()
    }
}

impl Stream {
    /// The stream's context id.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn with<R>(&self, f: impl FnOnce(&StreamState) -> R) -> R {
        let vm = self.vm.borrow();
        f(vm.store.data().streams.get(&self.id).expect("stream state"))
    }

    fn with_mut<R>(&self, f: impl FnOnce(&mut StreamState) -> R) -> R {
        let mut vm = self.vm.borrow_mut();
        f(vm.store
            .data_mut()
            .streams
            .get_mut(&self.id)
            .expect("stream state"))
    }

    fn alive(&self) {
        assert!(
            !self.with(|s| s.deleted),
            "stream {} was already deleted",
            self.id
        );
    }

    fn headers(
        &self,
        dir: Dir,
        trailers: bool,
        headers: &[(&str, &str)],
        eos: bool,
    ) -> Result<Action, Trap> {
        self.header_pairs(dir, trailers, pairs_of(headers), eos)
    }

    fn header_pairs(
        &self,
        dir: Dir,
        trailers: bool,
        map: Pairs,
        eos: bool,
    ) -> Result<Action, Trap> {
        self.alive();
        let state = self.with_mut(|s| {
            let side = dir.side(s);
            if side.over {
                Some(Action::NotCalled)
            } else if trailers && side.held {
                side.waiting_trailers = Some(map.clone());
                Some(Action::Buffered)
            } else {
                None
            }
        });
        if let Some(a) = state {
            return Ok(a);
        }
        let mut vm = self.vm.borrow_mut();
        vm.pump()?;
        let a = vm.deliver_headers(self.id, dir, trailers, map, eos)?;
        vm.pump()?;
        Ok(a)
    }

    fn body(&self, dir: Dir, chunk: &[u8], eos: bool) -> Result<Action, Trap> {
        self.alive();
        let state = self.with_mut(|s| {
            let side = dir.side(s);
            if side.over {
                Some(Action::NotCalled)
            } else if side.held {
                side.waiting_body
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(chunk);
                side.waiting_eos = eos;
                Some(Action::Buffered)
            } else {
                None
            }
        });
        if let Some(a) = state {
            return Ok(a);
        }
        let mut vm = self.vm.borrow_mut();
        vm.pump()?;
        let a = vm.deliver_body(self.id, dir, chunk, eos)?;
        vm.pump()?;
        Ok(a)
    }

    /// Delivers the request headers (`proxy_on_request_headers`). Names are lower-cased.
    pub fn request_headers(&self, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        self.try_request_headers(headers, end_of_stream)
            .unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_request_headers(
        &self,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action, Trap> {
        self.headers(Dir::Request, false, headers, end_of_stream)
    }

    /// [`Stream::request_headers`] with raw header values: Envoy passes bytes that are not
    /// UTF-8 in header values, and a filter must survive them.
    pub fn request_headers_bytes(&self, headers: &[(&str, &[u8])], end_of_stream: bool) -> Action {
        self.header_pairs(Dir::Request, false, raw_pairs_of(headers), end_of_stream)
            .unwrap_or_else(|t| trap_panic(t))
    }

    /// [`Stream::response_headers`] with raw header values.
    pub fn response_headers_bytes(&self, headers: &[(&str, &[u8])], end_of_stream: bool) -> Action {
        self.header_pairs(Dir::Response, false, raw_pairs_of(headers), end_of_stream)
            .unwrap_or_else(|t| trap_panic(t))
    }

    /// Delivers a request body chunk (`proxy_on_request_body`). While the filter answers
    /// `Pause`, chunks accumulate and `body_size` is the whole buffered body (Envoy's
    /// StopIterationAndBuffer); on `Continue` the buffer is forwarded. While the request
    /// headers are paused the chunk waits unseen ([`Action::Buffered`]) and is delivered when
    /// the filter resumes the request.
    pub fn request_body(&self, chunk: impl AsRef<[u8]>, end_of_stream: bool) -> Action {
        self.try_request_body(chunk, end_of_stream)
            .unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_request_body(
        &self,
        chunk: impl AsRef<[u8]>,
        end_of_stream: bool,
    ) -> Result<Action, Trap> {
        self.body(Dir::Request, chunk.as_ref(), end_of_stream)
    }

    /// Delivers request trailers (`proxy_on_request_trailers`).
    pub fn request_trailers(&self, trailers: &[(&str, &str)]) -> Action {
        self.try_request_trailers(trailers)
            .unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_request_trailers(&self, trailers: &[(&str, &str)]) -> Result<Action, Trap> {
        self.headers(Dir::Request, true, trailers, true)
    }

    /// Delivers the response headers (`proxy_on_response_headers`). [`Action::NotCalled`] after
    /// a local reply: the host already delivered that reply through the response callbacks,
    /// as Envoy does, and the response is over.
    pub fn response_headers(&self, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        self.try_response_headers(headers, end_of_stream)
            .unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_response_headers(
        &self,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action, Trap> {
        self.headers(Dir::Response, false, headers, end_of_stream)
    }

    /// Delivers a response body chunk (`proxy_on_response_body`), buffered like the request's.
    pub fn response_body(&self, chunk: impl AsRef<[u8]>, end_of_stream: bool) -> Action {
        self.try_response_body(chunk, end_of_stream)
            .unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_response_body(
        &self,
        chunk: impl AsRef<[u8]>,
        end_of_stream: bool,
    ) -> Result<Action, Trap> {
        self.body(Dir::Response, chunk.as_ref(), end_of_stream)
    }

    /// Delivers response trailers (`proxy_on_response_trailers`).
    pub fn response_trailers(&self, trailers: &[(&str, &str)]) -> Action {
        self.try_response_trailers(trailers)
            .unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_response_trailers(&self, trailers: &[(&str, &str)]) -> Result<Action, Trap> {
        self.headers(Dir::Response, true, trailers, true)
    }

    /// Ends the stream as Envoy does: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`. The
    /// calls it dispatched stay pending (they are the root context's, as in Envoy).
    pub fn finish(&self) {
        self.try_finish().unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_finish(&self) -> Result<(), Trap> {
        self.try_on_log()?;
        self.try_on_done()?;
        self.try_delete()
    }

    /// `proxy_on_log` alone (the access-log phase: maps are read-only).
    pub fn on_log(&self) {
        self.try_on_log().unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_on_log(&self) -> Result<(), Trap> {
        self.alive();
        self.with_mut(|s| s.log_phase = true);
        let r = self
            .vm
            .borrow_mut()
            .run("proxy_on_log", self.id, &[self.id as i32]);
        self.with_mut(|s| s.log_phase = false);
        r.map(|_| ())
    }

    /// `proxy_on_done` alone; returns what the module answered.
    pub fn on_done(&self) -> bool {
        self.try_on_done().unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_on_done(&self) -> Result<bool, Trap> {
        self.alive();
        Ok(self
            .vm
            .borrow_mut()
            .run("proxy_on_done", self.id, &[self.id as i32])?
            .unwrap_or(1)
            != 0)
    }

    /// `proxy_on_delete`, then the host forgets the context. Its gRPC and HTTP calls are not
    /// cancelled: as in Envoy they belong to the root context, and can still be answered.
    pub fn delete(&self) {
        self.try_delete().unwrap_or_else(|t| trap_panic(t))
    }

    pub fn try_delete(&self) -> Result<(), Trap> {
        self.alive();
        let r = self
            .vm
            .borrow_mut()
            .run("proxy_on_delete", self.id, &[self.id as i32]);
        let mut vm = self.vm.borrow_mut();
        let s = vm.store.data_mut();
        s.contexts.remove(&self.id);
        if let Some(st) = s.streams.get_mut(&self.id) {
            st.deleted = true;
        }
        // The stream's calls are its root context's (Envoy): they stay pending, and their
        // replies still come, to the root context.
        r.map(|_| ())
    }

    // --- what the filter did ------------------------------------------------------------------

    /// The local reply the filter sent, if any.
    pub fn local_reply(&self) -> Option<LocalReply> {
        self.with(|s| s.local_reply.clone())
    }

    /// How many times the filter resumed the request (`proxy_continue_stream(HttpRequest)`).
    pub fn request_resumed(&self) -> u32 {
        self.with(|s| s.request.resumed)
    }

    /// How many times the filter resumed the response.
    pub fn response_resumed(&self) -> u32 {
        self.with(|s| s.response.resumed)
    }

    /// Whether the filter reset the request / response (`proxy_close_stream`).
    pub fn request_reset(&self) -> bool {
        self.with(|s| s.request.reset)
    }

    pub fn response_reset(&self) -> bool {
        self.with(|s| s.response.reset)
    }

    /// The request headers as they are now (after the filter's changes).
    pub fn current_request_headers(&self) -> Vec<(String, String)> {
        self.with(|s| {
            s.request
                .headers
                .map
                .as_ref()
                .map(strings)
                .unwrap_or_default()
        })
    }

    /// The response headers as they are now (after the filter's changes).
    pub fn current_response_headers(&self) -> Vec<(String, String)> {
        self.with(|s| {
            s.response
                .headers
                .map
                .as_ref()
                .map(strings)
                .unwrap_or_default()
        })
    }

    pub fn request_header(&self, name: &str) -> Option<String> {
        self.with(|s| {
            s.request
                .headers
                .map
                .as_ref()
                .and_then(|m| crate::state::get_header(m, name))
        })
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        self.with(|s| {
            s.response
                .headers
                .map
                .as_ref()
                .and_then(|m| crate::state::get_header(m, name))
        })
    }

    /// Response headers the filter added or replaced, in order.
    pub fn response_headers_added(&self) -> Vec<(String, String)> {
        self.with(|s| {
            s.changes
                .iter()
                .filter_map(|c| match c {
                    HeaderChange::Add(MapType::HttpResponseHeaders, k, v)
                    | HeaderChange::Replace(MapType::HttpResponseHeaders, k, v) => {
                        Some((k.clone(), String::from_utf8_lossy(v).into_owned()))
                    }
                    _ => None,
                })
                .collect()
        })
    }

    /// Every change the filter made to this stream's header maps.
    pub fn header_changes(&self) -> Vec<HeaderChange> {
        self.with(|s| s.changes.clone())
    }

    /// Body bytes that went past the filter (after its changes), request and response side.
    pub fn request_body_forwarded(&self) -> Vec<u8> {
        self.with(|s| s.request.forwarded.clone())
    }

    pub fn response_body_forwarded(&self) -> Vec<u8> {
        self.with(|s| s.response.forwarded.clone())
    }

    /// Every callback the host made for this stream and what it returned, e.g.
    /// `proxy_on_request_headers(2, eos=false) -> Pause` (for assertions and debugging).
    pub fn callbacks(&self) -> Vec<String> {
        self.with(|s| s.callbacks.clone())
    }

    /// What the filter logged while this stream was the effective context.
    pub fn logs(&self) -> Vec<LogEntry> {
        let vm = self.vm.borrow();
        vm.store
            .data()
            .logs
            .iter()
            .filter(|l| l.context_id == self.id)
            .cloned()
            .collect()
    }

    /// The contexts the module made effective (`proxy_set_effective_context`) during this
    /// stream's callbacks, in order: e.g. `[1, 2]` for a call dispatched as the root context's
    /// (1) and the stream (2) made effective again.
    pub fn effective_context_switches(&self) -> Vec<u32> {
        let vm = self.vm.borrow();
        vm.store
            .data()
            .effective_switches
            .iter()
            .filter(|(callback, _)| *callback == self.id)
            .map(|(_, to)| *to)
            .collect()
    }

    /// gRPC calls this stream made (it was the effective context) that are still pending.
    pub fn pending_grpc_calls(&self) -> Vec<GrpcCall> {
        let vm = self.vm.borrow();
        vm.store
            .data()
            .grpc_calls
            .values()
            .filter(|c| c.context_id == self.id && c.state == CallState::Pending)
            .cloned()
            .collect()
    }

    /// A property of this stream only (raw bytes, Envoy's encoding).
    pub fn set_property(&self, path: &[&str], value: impl AsRef<[u8]>) {
        let value = value.as_ref().to_vec();
        self.with_mut(|s| s.properties.insert(property_key(path), value));
    }

    pub fn set_property_str(&self, path: &[&str], value: &str) {
        self.set_property(path, value.as_bytes())
    }

    /// 8 bytes little-endian, as Envoy encodes ints.
    pub fn set_property_i64(&self, path: &[&str], value: i64) {
        self.set_property(path, value.to_le_bytes())
    }

    /// One byte, as Envoy encodes bools.
    pub fn set_property_bool(&self, path: &[&str], value: bool) {
        self.set_property(path, [value as u8])
    }

    /// A property the filter set on this stream with `proxy_set_property`.
    pub fn module_property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.with(|s| s.module_properties.get(&property_key(path)).cloned())
    }
}
