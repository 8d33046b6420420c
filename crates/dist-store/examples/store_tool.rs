//! A stand-alone front end of this crate's library entry points, for use where the `dist` CLI
//! is not built (the device machine, quick manual tests):
//! `store_tool run ...` (= `dist run`), `store_tool serve ...` (= `dist store serve`),
//! `store_tool bench ...` (= `dist bench store`) and `store_tool interop HOST PORT`
//! (our client against any TCPStore master, e.g. PyTorch's).

use std::time::Duration;

use clap::{Parser, Subcommand};
use dist_core::Store;
use dist_store::{ClientOptions, TcpStoreClient};

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Launch ranks (`dist run`).
    Run(dist_store::launch::LaunchOptions),
    /// Serve a store (`dist store serve`).
    Serve(dist_store::launch::ServeOptions),
    /// Benchmark the store (`dist bench store`).
    Bench(dist_store::bench::StoreBenchOptions),
    /// Exercise every client call against the master at HOST:PORT and print what it answered.
    Interop {
        /// Host of the master.
        host: String,
        /// Port of the master.
        port: u16,
        /// Key prefix to use.
        #[arg(long, default_value = "rs/")]
        prefix: String,
        /// Skip the queue calls (PyTorch's legacy server has none).
        #[arg(long)]
        no_queues: bool,
    },
}

fn interop(host: &str, port: u16, p: &str, queues: bool) -> Result<(), String> {
    let e = |x: dist_core::Error| x.to_string();
    let t = Duration::from_secs(10);
    let c = TcpStoreClient::connect(
        host,
        port,
        ClientOptions {
            timeout: t,
            connect_timeout: t,
            ..Default::default()
        },
    )
    .map_err(e)?;
    let mut ok = 0;
    let mut check = |name: &str, cond: bool| -> Result<(), String> {
        if cond {
            ok += 1;
            println!("  ok {name}");
            Ok(())
        } else {
            Err(format!("{name} failed"))
        }
    };
    c.ping().map_err(e)?;
    check("ping", true)?;
    c.set(&format!("{p}a"), b"va").map_err(e)?;
    check("set/get", c.get(&format!("{p}a"), t).map_err(e)? == b"va")?;
    check(
        "add",
        c.add(&format!("{p}n"), 3).map_err(e)? == 3 && c.add(&format!("{p}n"), 4).map_err(e)? == 7,
    )?;
    check(
        "add stores decimal text",
        c.get(&format!("{p}n"), t).map_err(e)? == b"7",
    )?;
    check(
        "compare_set missing+empty",
        c.compare_set(&format!("{p}cs"), b"", b"x").map_err(e)? == b"x",
    )?;
    check(
        "compare_set mismatch",
        c.compare_set(&format!("{p}cs"), b"no", b"y").map_err(e)? == b"x",
    )?;
    check(
        "compare_set match",
        c.compare_set(&format!("{p}cs"), b"x", b"y").map_err(e)? == b"y",
    )?;
    check(
        "compare_set missing+expected",
        c.compare_set(&format!("{p}none"), b"e", b"d").map_err(e)? == b"e",
    )?;
    check(
        "check",
        c.check(&[&format!("{p}a")]).map_err(e)? && !c.check(&[&format!("{p}none")]).map_err(e)?,
    )?;
    c.append(&format!("{p}ap"), b"12").map_err(e)?;
    c.append(&format!("{p}ap"), b"34").map_err(e)?;
    check("append", c.get(&format!("{p}ap"), t).map_err(e)? == b"1234")?;
    let (k1, k2) = (format!("{p}m1"), format!("{p}m2"));
    c.multi_set(&[&k1, &k2], &[b"1", b"2"]).map_err(e)?;
    check(
        "multi_set/multi_get",
        c.multi_get(&[&k1, &k2], t).map_err(e)? == vec![b"1".to_vec(), b"2".to_vec()],
    )?;
    check(
        "delete",
        c.delete(&k1).map_err(e)? && !c.delete(&k1).map_err(e)?,
    )?;
    let n = c.num_keys().map_err(e)?;
    check("num_keys", n >= 5)?;
    let t0 = std::time::Instant::now();
    let err = c
        .wait(&[&format!("{p}never")], Duration::from_millis(300))
        .unwrap_err();
    check(
        "wait timeout + CANCEL_WAIT",
        err.is_timeout()
            && err.to_string().contains("never")
            && t0.elapsed() < Duration::from_secs(3),
    )?;
    check(
        "connection usable after cancel",
        c.get(&format!("{p}a"), t).map_err(e)? == b"va",
    )?;
    if queues {
        c.queue_push(&format!("{p}q"), b"item").map_err(e)?;
        check("queue_len", c.queue_len(&format!("{p}q")).map_err(e)? == 1)?;
        check(
            "queue_pop",
            c.queue_pop(&format!("{p}q"), Some(t))
                .map_err(e)?
                .as_deref()
                == Some(&b"item"[..]),
        )?;
    }
    // Leave a key for the other side to read.
    c.set(&format!("{p}from_rust"), b"hello torch").map_err(e)?;
    println!("interop client: {ok} checks passed");
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(o) => dist_store::launch::run(&o).unwrap_or_else(|e| {
            eprintln!("dist run: {e}");
            1
        }),
        Cmd::Serve(o) => dist_store::launch::serve(&o).unwrap_or_else(|e| {
            eprintln!("dist store serve: {e}");
            1
        }),
        Cmd::Bench(o) => dist_store::bench::run(&o).unwrap_or_else(|e| {
            eprintln!("dist bench store: {e}");
            1
        }),
        Cmd::Interop {
            host,
            port,
            prefix,
            no_queues,
        } => match interop(&host, port, &prefix, !no_queues) {
            Ok(()) => 0,
            Err(m) => {
                eprintln!("interop: FAILED: {m}");
                1
            }
        },
    };
    std::process::exit(code);
}
