//! The launcher behind `dist run`: torchrun's contract as a library.
//!
//! [`run`] starts `--nproc-per-node` copies of a program on this node, one per rank, and:
//! - on node 0 hosts the job's store on `MASTER_ADDR:MASTER_PORT` (a free port when none is
//!   given), so the ranks rendezvous through it as torchrun's agent store
//!   (`TORCHELASTIC_USE_AGENT_STORE=True` tells PyTorch and [`StatelessProcessGroup::from_env`]
//!   not to start a second server);
//! - sets `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `ROLE_RANK`,
//!   `ROLE_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, `TORCHELASTIC_RESTART_COUNT=0` (and
//!   `OMP_NUM_THREADS=1` when unset and
//!   several ranks share the node, as torchrun does);
//! - prefixes each line a rank prints with `[rank N] ` (stdout to stdout, stderr to stderr);
//! - forwards SIGINT and SIGTERM to every rank (each rank leads its own process group, so
//!   its children get them too); a second signal kills;
//! - when a rank fails, stops the others (SIGTERM, then SIGKILL after `--kill-grace`) and
//!   exits with that rank's status (128 + N for a rank killed by signal N);
//! - with `--timeout SECS`, kills a job still running after SECS and exits with 124.
//!
//! Without `--nnodes`/`--node-rank`/`--master-addr`, it reads SLURM's (`SLURM_NNODES`,
//! `SLURM_NODEID`, the first host of `SLURM_JOB_NODELIST`) or Open MPI's
//! (`OMPI_COMM_WORLD_SIZE`/`OMPI_COMM_WORLD_RANK`, one launcher per node) variables, then
//! `MASTER_ADDR`/`MASTER_PORT` from the environment.
//!
//! Every child is held by a guard whose `Drop` kills its process group and reaps it, and gets
//! the parent-death signal (SIGKILL when the launcher dies, even by SIGKILL; a rank whose
//! launcher died before the signal was armed exits at once), so no rank outlives the launcher,
//! whatever path it leaves by.
//!
//! **Exposure.** On one node the store binds `MASTER_ADDR` (loopback by default). With several
//! nodes it binds `--master-addr` when that is an IP address of this host, otherwise every
//! interface; without `--token-file`, anyone who can reach that port can read, write and delete
//! every key of the job (and feed its ranks whatever they read back), and the launcher says so
//! on stderr at start. It does not make up a token itself: the other nodes' ranks would need it
//! and the launcher has no channel to give it to them, and PyTorch ranks, which never send one,
//! would be refused. Give every node the same `--token-file` (see `docs/SECURITY.md`).
//!
//! When a rank fails, the launcher reads every rank's last flight-recorder snapshot from the
//! store and names the call the failed rank was in (`rank 1 failed with signal 9 (SIGKILL)
//! while in tp:0 all_reduce #12 …`), then what each rank was last doing.
//!
//! [`StatelessProcessGroup::from_env`]: crate::StatelessProcessGroup::from_env

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys;
use crate::{ServerOptions, StoreServer};

/// Options of `dist run` (the CLI's flags map one to one onto these fields).
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Ranks to start on this node.
    pub nproc_per_node: usize,
    /// Number of nodes (default: SLURM_NNODES, OMPI_COMM_WORLD_SIZE, else 1).
    pub nnodes: Option<usize>,
    /// This node's index (default: SLURM_NODEID, OMPI_COMM_WORLD_RANK, else 0).
    pub node_rank: Option<usize>,
    /// Address of node 0, where the store runs (default: MASTER_ADDR, SLURM's first node,
    /// else 127.0.0.1).
    pub master_addr: Option<String>,
    /// Port of the store on node 0 (default: MASTER_PORT; else a free port on one node, 29500
    /// on several).
    pub master_port: Option<u16>,
    /// Kill the job if it still runs after this many seconds (exit status 124).
    pub timeout: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when stopping ranks.
    pub kill_grace: f64,
    /// Do not prefix output lines with `[rank N]`.
    pub no_prefix: bool,
    /// Require this shared secret on the store (passed to ranks as DIST_STORE_TOKEN_FILE).
    pub token_file: Option<PathBuf>,
    /// The program and its arguments.
    pub program: Vec<OsString>,
}

impl LaunchOptions {
    /// Options for `nproc` local ranks of `program` (the rest default).
    pub fn new(nproc: usize, program: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        LaunchOptions {
            nproc_per_node: nproc,
            nnodes: None,
            node_rank: None,
            master_addr: None,
            master_port: None,
            timeout: None,
            kill_grace: 5.0,
            no_prefix: false,
            token_file: None,
            program: program.into_iter().map(Into::into).collect(),
        }
    }
}

/// Where this node sits in the job, after flags and environment are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLayout {
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's index.
    pub node_rank: usize,
    /// Ranks per node.
    pub nproc_per_node: usize,
    /// Node 0's address.
    pub master_addr: String,
    /// Store port, if known before binding.
    pub master_port: Option<u16>,
}

/// The first host of a SLURM node list (`node[01-04,07],other` → `node01`).
pub fn slurm_first_host(list: &str) -> Option<String> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    let mut depth = 0;
    let first = list
        .split(|c| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .next()?;
    match first.find('[') {
        None => Some(first.to_string()),
        Some(i) => {
            let base = &first[..i];
            let inner = first[i + 1..].trim_end_matches(']');
            let range = inner.split(',').next()?;
            let lo = range.split('-').next()?;
            Some(format!("{base}{lo}"))
        }
    }
}

/// Resolves the layout from flags, then SLURM, Open MPI and torchrun-style variables.
pub fn resolve_layout(opts: &LaunchOptions) -> io::Result<JobLayout> {
    resolve_layout_with(opts, |k| std::env::var(k).ok())
}

/// [`resolve_layout`] with the environment given as a lookup function.
pub fn resolve_layout_with(
    opts: &LaunchOptions,
    env: impl Fn(&str) -> Option<String>,
) -> io::Result<JobLayout> {
    let env_num = |k: &str| -> Option<usize> { env(k)?.trim().parse().ok() };
    let nnodes = opts
        .nnodes
        .or_else(|| env_num("SLURM_NNODES"))
        .or_else(|| env_num("OMPI_COMM_WORLD_SIZE"))
        .unwrap_or(1);
    let node_rank = opts
        .node_rank
        .or_else(|| env_num("SLURM_NODEID"))
        .or_else(|| env_num("OMPI_COMM_WORLD_RANK"))
        .unwrap_or(0);
    let master_addr = opts
        .master_addr
        .clone()
        .or_else(|| env("MASTER_ADDR"))
        .or_else(|| {
            env("SLURM_JOB_NODELIST")
                .or_else(|| env("SLURM_NODELIST"))
                .and_then(|l| slurm_first_host(&l))
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    let master_port = opts
        .master_port
        .or_else(|| env("MASTER_PORT").and_then(|p| p.trim().parse().ok()));
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    if opts.nproc_per_node == 0 {
        return Err(bad("--nproc-per-node must be at least 1".into()));
    }
    if nnodes == 0 || node_rank >= nnodes {
        return Err(bad(format!(
            "node rank {node_rank} is out of range for {nnodes} nodes"
        )));
    }
    Ok(JobLayout {
        nnodes,
        node_rank,
        nproc_per_node: opts.nproc_per_node,
        master_addr,
        master_port: master_port.or((nnodes > 1).then_some(29500)),
    })
}

struct Rank {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
}

/// Holds the ranks; dropping it kills every process group still alive and reaps it.
struct Ranks(Vec<Rank>);

impl Ranks {
    fn signal_live(&self, sig: i32) {
        for r in &self.0 {
            if r.status.is_none() {
                sys::signal_group(r.child.id(), sig);
            }
        }
    }

    fn poll(&mut self) -> io::Result<()> {
        for r in &mut self.0 {
            if r.status.is_none() {
                r.status = r.child.try_wait()?;
            }
        }
        Ok(())
    }

    fn live(&self) -> Vec<usize> {
        self.0
            .iter()
            .filter(|r| r.status.is_none())
            .map(|r| r.rank)
            .collect()
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps everything.
    fn stop_all(&mut self, grace: Duration) -> io::Result<()> {
        self.signal_live(libc::SIGTERM);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            self.poll()?;
            if self.live().is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_live(libc::SIGKILL);
        for r in &mut self.0 {
            if r.status.is_none() {
                r.status = Some(r.child.wait()?);
            }
        }
        Ok(())
    }
}

impl Drop for Ranks {
    /// Kills each rank's whole process group (a rank that exited may have left children
    /// behind, which would keep its output pipe open) and reaps ranks still running. A group
    /// id is not reused while any member of the group lives, so this reaches only our ranks'
    /// descendants that stayed in their group.
    fn drop(&mut self) {
        for r in &mut self.0 {
            sys::signal_group(r.child.id(), libc::SIGKILL);
            if r.status.is_none() {
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
        }
    }
}

/// The exit code a shell would report for `s`.
pub fn exit_code(s: ExitStatus) -> i32 {
    match (s.code(), s.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("signal {sig} ({})", sys::signal_name(sig)),
        _ => "unknown status".into(),
    }
}

/// Copies lines from `from` to `to`, each prefixed with `prefix`; a last line without a
/// newline gets one. Returns when `from` ends.
pub fn prefix_lines<R: Read, W: Write>(
    from: R,
    mut to: impl FnMut() -> W,
    prefix: &[u8],
) -> io::Result<()> {
    let mut r = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        let mut out = Vec::with_capacity(prefix.len() + line.len());
        out.extend_from_slice(prefix);
        out.extend_from_slice(&line);
        let mut w = to();
        w.write_all(&out)?;
        w.flush()?;
    }
}

fn forward(
    from: impl Read + Send + 'static,
    stderr: bool,
    prefix: Vec<u8>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("dist-run-output".into())
        .spawn(move || {
            let r = if stderr {
                prefix_lines(from, || io::stderr().lock(), &prefix)
            } else {
                prefix_lines(from, || io::stdout().lock(), &prefix)
            };
            let _ = r;
        })
}

/// Runs the job described by `opts` and returns the launcher's exit code (see the module docs).
pub fn run(opts: &LaunchOptions) -> io::Result<i32> {
    let layout = resolve_layout(opts)?;
    let Some(program) = opts.program.first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no program given",
        ));
    };
    sys::catch_termination_signals();
    let token = match &opts.token_file {
        Some(p) => Some(crate::auth::read_token_file(p).map_err(to_io)?),
        None => None,
    };
    // Node 0 hosts the store.
    let server = if layout.node_rank == 0 {
        let host = store_bind_host(&layout);
        let server = StoreServer::start(ServerOptions {
            host: host.clone(),
            port: layout.master_port.unwrap_or(0),
            token: token.clone(),
            ..Default::default()
        })
        .map_err(to_io)?;
        if layout.nnodes > 1 && token.is_none() {
            warn_open_store(&server);
        }
        Some(server)
    } else {
        None
    };
    let port = match (&server, layout.master_port) {
        (Some(s), _) => s.port(),
        (None, Some(p)) => p,
        (None, None) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--master-port is required on nodes other than 0",
            ))
        }
    };
    let world = layout.nnodes * layout.nproc_per_node;
    let start = Instant::now();
    let mut ranks = Ranks(Vec::new());
    let mut readers = Vec::new();
    for local in 0..layout.nproc_per_node {
        let rank = layout.node_rank * layout.nproc_per_node + local;
        let mut cmd = Command::new(program);
        cmd.args(&opts.program[1..])
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", layout.nproc_per_node.to_string())
            .env("GROUP_RANK", layout.node_rank.to_string())
            .env("ROLE_RANK", rank.to_string())
            .env("ROLE_WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", &layout.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env("TORCHELASTIC_USE_AGENT_STORE", "True")
            .env("TORCHELASTIC_RESTART_COUNT", "0")
            .env("TORCHELASTIC_MAX_RESTARTS", "0")
            .env(
                "TORCHELASTIC_RUN_ID",
                format!("dist-run-{}", std::process::id()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(p) = &opts.token_file {
            cmd.env("DIST_STORE_TOKEN_FILE", p);
        }
        sys::kill_with_parent(&mut cmd);
        if layout.nproc_per_node > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
            cmd.env("OMP_NUM_THREADS", "1");
        }
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("dist run: cannot start {}: {e}", program.to_string_lossy()),
            )
        })?;
        let prefix = if opts.no_prefix {
            Vec::new()
        } else {
            format!("[rank {rank}] ").into_bytes()
        };
        if let Some(o) = child.stdout.take() {
            readers.push(forward(o, false, prefix.clone())?);
        }
        if let Some(e) = child.stderr.take() {
            readers.push(forward(e, true, prefix)?);
        }
        ranks.0.push(Rank {
            rank,
            child,
            status: None,
        });
    }
    let grace = Duration::from_secs_f64(opts.kill_grace.max(0.0));
    let deadline = opts
        .timeout
        .map(|t| start + Duration::from_secs_f64(t.max(0.0)));
    let mut signals = 0;
    let code = loop {
        if let Some(sig) = sys::take_signal() {
            signals += 1;
            if signals == 1 {
                eprintln!(
                    "dist run: got {}; forwarding it to every rank",
                    sys::signal_name(sig)
                );
                ranks.signal_live(sig);
            } else {
                eprintln!("dist run: second signal; killing every rank");
                ranks.signal_live(libc::SIGKILL);
            }
        }
        ranks.poll()?;
        if let Some(failed) = ranks
            .0
            .iter()
            .filter_map(|r| r.status.filter(|s| !s.success()).map(|s| (r.rank, s)))
            .next()
        {
            let live = ranks.live();
            let snaps = read_snapshots(&layout.master_addr, port, token_for_summary(opts), world);
            let doing = snaps
                .get(failed.0)
                .and_then(|s| s.as_ref())
                .map(|s| in_call(s, dist_core::diag::now_ms()))
                .unwrap_or_default();
            if !live.is_empty() {
                eprintln!(
                    "dist run: rank {} failed with {}{doing}; stopping ranks {live:?}",
                    failed.0,
                    describe(failed.1)
                );
            } else {
                eprintln!(
                    "dist run: rank {} failed with {}{doing}",
                    failed.0,
                    describe(failed.1)
                );
            }
            print_rank_summary(&snaps);
            ranks.stop_all(grace)?;
            break exit_code(failed.1);
        }
        if ranks.live().is_empty() {
            break 0;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!(
                "dist run: timed out after {:.1} s; killing ranks {:?} still running",
                start.elapsed().as_secs_f64(),
                ranks.live()
            );
            print_rank_summary(&read_snapshots(
                &layout.master_addr,
                port,
                token_for_summary(opts),
                world,
            ));
            ranks.stop_all(grace.min(Duration::from_secs(2)))?;
            break 124;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(ranks);
    // Output of ranks that left grandchildren holding the pipes is not waited for long.
    let until = Instant::now() + Duration::from_secs(2);
    for r in readers {
        while !r.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if r.is_finished() {
            let _ = r.join();
        }
    }
    drop(server);
    Ok(code)
}

fn token_for_summary(opts: &LaunchOptions) -> Option<Vec<u8>> {
    opts.token_file
        .as_ref()
        .and_then(|p| crate::auth::read_token_file(p).ok())
}

/// Where the store listens: on one node `MASTER_ADDR`; on several, `MASTER_ADDR` when it is
/// an IP address (of this host: binding fails otherwise), else every IPv4 interface.
fn store_bind_host(layout: &JobLayout) -> String {
    if layout.nnodes == 1 || layout.master_addr.parse::<std::net::IpAddr>().is_ok() {
        layout.master_addr.clone()
    } else {
        "0.0.0.0".to_string()
    }
}

/// The warning for a store that other hosts can reach and that takes no token.
fn warn_open_store(server: &StoreServer) {
    let addrs: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
    eprintln!(
        "dist run: WARNING: the job's store listens on {} with no token. Anyone who can reach \
         this port can read, change and delete every key of the job, and so feed its ranks \
         whatever they read from it. Give every node the same --token-file (a secret file, \
         chmod 600), or keep the port behind a firewall; see docs/SECURITY.md.",
        addrs.join(", ")
    );
}

/// The last flight-recorder snapshot of every rank (`dist_core::diag::snapshot_key`), read
/// with one `MULTI_GET`; `None` for a rank that published none (or when the store is gone).
fn read_snapshots(
    host: &str,
    port: u16,
    token: Option<Vec<u8>>,
    world: usize,
) -> Vec<Option<dist_core::diag::Snapshot>> {
    use dist_core::diag::{snapshot_key, Snapshot};
    let opts = crate::ClientOptions {
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        token,
        ..Default::default()
    };
    let none = || vec![None; world];
    let Ok(client) = crate::TcpStoreClient::connect(host, port, opts) else {
        return none();
    };
    let keys: Vec<String> = (0..world).map(snapshot_key).collect();
    let refs: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let Ok(values) = client.multi_get_now(&refs) else {
        return none();
    };
    values
        .into_iter()
        .map(|b| {
            (!b.is_empty())
                .then(|| dist_core::decode_obj::<Snapshot>(&b, 1 << 20).ok())
                .flatten()
        })
        .collect()
}

/// ` while in tp:0 all_reduce #12 (4096 B, started 0.3 s ago)` when the rank's last recorded
/// call had not returned, else ` after tp:0 all_reduce #12 (done 1.0 s ago)`; empty without one.
fn in_call(s: &dist_core::diag::Snapshot, now_ms: u64) -> String {
    use dist_core::diag::OpState;
    let Some(r) = s.records.last() else {
        return String::new();
    };
    let ago = |t: u64| now_ms.saturating_sub(t) as f64 / 1000.0;
    match (r.state, r.ended_ms) {
        (OpState::Running, _) | (_, None) => format!(
            " while in {} {} #{} ({} B, started {:.1} s ago)",
            r.group,
            r.op,
            r.seq,
            r.bytes,
            ago(r.started_ms)
        ),
        (_, Some(e)) => format!(
            " after {} {} #{} ({} {:.1} s ago)",
            r.group,
            r.op,
            r.seq,
            if r.state == OpState::Done {
                "done"
            } else {
                "failed"
            },
            ago(e)
        ),
    }
}

/// Prints what each rank was last doing; prints nothing when no rank published a snapshot.
fn print_rank_summary(snaps: &[Option<dist_core::diag::Snapshot>]) {
    let now = dist_core::diag::now_ms();
    let lines: Vec<String> = snaps.iter().flatten().map(|s| s.describe(now)).collect();
    if !lines.is_empty() {
        eprintln!("dist run: what each rank was last doing:");
        for l in lines {
            eprintln!("dist run:   {l}");
        }
    }
}

fn to_io(e: crate::Error) -> io::Error {
    match e {
        crate::Error::Io { context, source } => {
            io::Error::new(source.kind(), format!("{context}: {source}"))
        }
        e => io::Error::other(e.to_string()),
    }
}

/// Options of `dist store serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to bind (`0.0.0.0` or `::` for every interface).
    pub host: String,
    /// Port to bind (0: a free one, printed at start).
    pub port: u16,
    /// File holding a shared secret every client must present.
    pub token_file: Option<PathBuf>,
    /// Most concurrent connections (lowered to the open-file limit).
    pub max_connections: usize,
    /// Event-loop threads (default: the machine's parallelism, at most 4).
    pub threads: Option<usize>,
    /// Memory budget for partially received requests, bytes.
    pub max_buffered_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 29500,
            token_file: None,
            max_connections: ServerOptions::default().max_connections,
            threads: None,
            max_buffered_bytes: ServerOptions::default().max_buffered_bytes,
        }
    }
}

/// Runs a standalone store server until SIGINT or SIGTERM; returns the exit code.
pub fn serve(opts: &ServeOptions) -> io::Result<i32> {
    sys::catch_termination_signals();
    let token = match &opts.token_file {
        Some(p) => Some(crate::auth::read_token_file(p).map_err(to_io)?),
        None => None,
    };
    let server = StoreServer::start(ServerOptions {
        host: opts.host.clone(),
        port: opts.port,
        token,
        max_connections: opts.max_connections,
        max_buffered_bytes: opts.max_buffered_bytes,
        threads: opts
            .threads
            .unwrap_or_else(|| ServerOptions::default().threads),
        ..Default::default()
    })
    .map_err(to_io)?;
    let addrs: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
    println!("dist store: serving on {}", addrs.join(", "));
    io::stdout().flush()?;
    loop {
        if let Some(sig) = sys::take_signal() {
            eprintln!("dist store: got {}; stopping", sys::signal_name(sig));
            break;
        }
        if !server.is_running() {
            eprintln!("dist store: the server loop stopped");
            return Ok(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    server.shutdown();
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_node_lists() {
        assert_eq!(
            slurm_first_host("node[01-04,07],other").as_deref(),
            Some("node01")
        );
        assert_eq!(slurm_first_host("a,b").as_deref(), Some("a"));
        assert_eq!(slurm_first_host("gpu[3]").as_deref(), Some("gpu3"));
        assert_eq!(slurm_first_host(""), None);
    }

    #[test]
    fn lines_are_prefixed() {
        let mut out = Vec::new();
        {
            let sink = std::cell::RefCell::new(&mut out);
            prefix_lines(&b"a\nbc\nlast"[..], || VecWriter(&sink), b"[rank 3] ").unwrap();
        }
        assert_eq!(out, b"[rank 3] a\n[rank 3] bc\n[rank 3] last\n");
    }

    struct VecWriter<'a, 'b>(&'a std::cell::RefCell<&'b mut Vec<u8>>);
    impl Write for VecWriter<'_, '_> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn layout_from_slurm_and_open_mpi() {
        let o = LaunchOptions::new(8, ["true"]);
        let slurm = |k: &str| {
            match k {
                "SLURM_NNODES" => Some("4"),
                "SLURM_NODEID" => Some("2"),
                "SLURM_JOB_NODELIST" => Some("gpu[07-10]"),
                _ => None,
            }
            .map(String::from)
        };
        let l = resolve_layout_with(&o, slurm).unwrap();
        assert_eq!(
            l,
            JobLayout {
                nnodes: 4,
                node_rank: 2,
                nproc_per_node: 8,
                master_addr: "gpu07".into(),
                master_port: Some(29500)
            }
        );
        let ompi = |k: &str| {
            match k {
                "OMPI_COMM_WORLD_SIZE" => Some("2"),
                "OMPI_COMM_WORLD_RANK" => Some("1"),
                "MASTER_ADDR" => Some("10.1.1.1"),
                "MASTER_PORT" => Some("4000"),
                _ => None,
            }
            .map(String::from)
        };
        let l = resolve_layout_with(&o, ompi).unwrap();
        assert_eq!(
            (l.nnodes, l.node_rank, l.master_addr.as_str(), l.master_port),
            (2, 1, "10.1.1.1", Some(4000))
        );
        // Flags win over the environment; one node without a port picks a free one later.
        let mut o = LaunchOptions::new(2, ["true"]);
        o.nnodes = Some(1);
        o.node_rank = Some(0);
        let l = resolve_layout_with(&o, slurm).unwrap();
        assert_eq!((l.nnodes, l.node_rank, l.master_port), (1, 0, None));
    }

    #[test]
    fn layout_from_flags() {
        let mut o = LaunchOptions::new(4, ["true"]);
        o.nnodes = Some(2);
        o.node_rank = Some(1);
        o.master_addr = Some("10.0.0.1".into());
        let l = resolve_layout(&o).unwrap();
        assert_eq!((l.nnodes, l.node_rank, l.master_port), (2, 1, Some(29500)));
        o.node_rank = Some(2);
        assert!(resolve_layout(&o).is_err());
    }
}
