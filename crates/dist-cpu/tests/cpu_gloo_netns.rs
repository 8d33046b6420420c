//! The cross-node path for real: two network namespaces joined by a veth pair, each with its
//! own address and two ranks of one job. `CpuBackend` must pick gloo by itself (the ranks are
//! on different "nodes") and every op must match the oracles. Needs root (`ip netns`);
//! otherwise it prints that it skipped.
#![cfg(feature = "gloo")]

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dist_core::{
    reference, Backend, CommunicatorContext, DType, DeviceCommunicator, HostGroup, HostTensor,
    ReduceOp,
};
use dist_cpu::CpuBackend;
use dist_store::StatelessProcessGroup;

const TEST: &str = "two_namespaces_use_gloo_and_match_the_oracles";
const WORLD: usize = 4;

fn child() -> ! {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and changes only this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    let r = (|| -> Result<String, String> {
        let e = |x: dist_core::Error| x.to_string();
        let t = Duration::from_secs(30);
        let g = Arc::new(StatelessProcessGroup::from_env(t).map_err(e)?);
        let ctx = CommunicatorContext {
            group_name: "netns".into(),
            ranks: (0..g.world_size()).collect(),
            rank_in_group: g.rank(),
            local_rank: g.rank() % 2,
            host_group: g.clone(),
            store: g.store().clone(),
            timeout: t,
        };
        let c = CpuBackend::create_communicator(&ctx).map_err(e)?;
        if c.kind() != "gloo" {
            return Err(format!("picked {} across namespaces", c.kind()));
        }
        let (r, n) = (g.rank(), g.world_size());
        for (i, d) in [DType::I32, DType::I64, DType::U8].into_iter().enumerate() {
            let x: Vec<HostTensor> = (0..n)
                .map(|q| HostTensor::random(d, &[3, 1000 + i], (i * 10 + q) as u64))
                .collect();
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
                let want = reference::all_reduce(&x, op).map_err(e)?;
                if c.all_reduce(&x[r], op).map_err(e)? != want {
                    return Err(format!("all_reduce {d} {op}"));
                }
            }
            for dim in [0isize, 1] {
                if c.all_gather(&x[r], dim).map_err(e)?
                    != reference::all_gather(&x, dim).map_err(e)?
                {
                    return Err(format!("all_gather {d} dim {dim}"));
                }
            }
            let want = reference::reduce_scatter(&x, 1, ReduceOp::Sum);
            if let Ok(want) = want {
                if c.reduce_scatter(&x[r], 1, ReduceOp::Sum).map_err(e)? != want[r] {
                    return Err(format!("reduce_scatter {d}"));
                }
            }
            let mut b = x[r].clone();
            c.broadcast(&mut b.view_mut(), 3).map_err(e)?;
            if b != x[3] {
                return Err(format!("broadcast {d}"));
            }
            // Across the namespaces: 0 <-> 2, 1 <-> 3.
            let peer = (r + 2) % n;
            let mut got = HostTensor::zeros(d, &[3, 1000 + i]);
            if r < 2 {
                c.send(&x[r].view(), peer).map_err(e)?;
                c.recv(&mut got.view_mut(), peer).map_err(e)?;
            } else {
                c.recv(&mut got.view_mut(), peer).map_err(e)?;
                c.send(&x[r].view(), peer).map_err(e)?;
            }
            if got != x[peer] {
                return Err(format!("send/recv {d}"));
            }
        }
        g.barrier().map_err(e)?;
        Ok(format!("rank {r} ok on {}", c.kind()))
    })();
    let mut o = std::io::stdout().lock();
    match r {
        Ok(m) => {
            let _ = writeln!(o, "NETNS OK {m}");
            let _ = o.flush();
            std::process::exit(0)
        }
        Err(m) => {
            let _ = writeln!(o, "NETNS FAIL {m}");
            let _ = o.flush();
            std::process::exit(1)
        }
    }
}

/// Deletes the namespaces (and with them the veth pair) when the test ends.
struct Netns(Vec<String>);
impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
#[cfg_attr(
    dist_cpu_not_root,
    ignore = "SKIPPED: the two-namespace gloo test needs root (ip netns); the build was not root"
)]
fn two_namespaces_use_gloo_and_match_the_oracles() {
    if std::env::var("DIST_CPU_NETNS_CHILD").is_ok() {
        child();
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the build ran as root, this test does not: it needs root (ip netns)"
    );
    let pid = std::process::id();
    let (a, b) = (format!("dcpu{pid}a"), format!("dcpu{pid}b"));
    let (va, vb) = (format!("vc{pid}a"), format!("vc{pid}b"));
    let net = 100 + pid % 100;
    let (ipa, ipb) = (format!("10.{net}.7.1"), format!("10.{net}.7.2"));
    let guard = Netns(vec![a.clone(), b.clone()]);
    let ok = ip(&["netns", "add", &a])
        && ip(&["netns", "add", &b])
        && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
        && ip(&["link", "set", &va, "netns", &a])
        && ip(&["link", "set", &vb, "netns", &b])
        && ip(&["-n", &a, "addr", "add", &format!("{ipa}/24"), "dev", &va])
        && ip(&["-n", &b, "addr", "add", &format!("{ipb}/24"), "dev", &vb])
        && ip(&["-n", &a, "link", "set", &va, "up"])
        && ip(&["-n", &b, "link", "set", &vb, "up"])
        && ip(&["-n", &a, "link", "set", "lo", "up"])
        && ip(&["-n", &b, "link", "set", "lo", "up"]);
    assert!(
        ok,
        "could not set up network namespaces as root (ip netns / veth refused)"
    );
    let exe = std::env::current_exe().unwrap();
    let port = 20000 + (pid % 20000) as u16;
    let kids: Vec<_> = (0..WORLD)
        .map(|r| {
            let (ns, addr) = if r < 2 { (&a, &ipa) } else { (&b, &ipb) };
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(&exe)
                .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
                .env("DIST_CPU_NETNS_CHILD", "1")
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", WORLD.to_string())
                .env("LOCAL_RANK", (r % 2).to_string())
                .env("LOCAL_WORLD_SIZE", "2")
                .env("MASTER_ADDR", &ipa)
                .env("MASTER_PORT", port.to_string())
                .env("DIST_GLOO_HOSTNAME", addr)
                .env_remove("DIST_CPU_BACKEND")
                .env_remove("TORCHELASTIC_USE_AGENT_STORE")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut failures = Vec::new();
    for (r, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find_map(|l| l.find("NETNS ").map(|i| l[i..].to_string()))
            .unwrap_or_else(|| "no report".into());
        eprintln!("rank {r}: {line}");
        if !out.status.success() || !line.starts_with("NETNS OK") {
            failures.push(format!("rank {r}: {line} ({})", out.status));
        }
    }
    drop(guard);
    assert!(failures.is_empty(), "{failures:?}");
}
