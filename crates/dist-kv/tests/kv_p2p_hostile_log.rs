//! What a hostile peer can trigger in the P2P engine's log is rate-limited: hundreds of refused
//! connections write a handful of lines. In a test binary of its own, so no other test uses up
//! the process-wide limit's window before the subscriber counts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dist_kv::transfer::p2p::wire::{write_frame, Frame, PROTOCOL_VERSION};
use dist_kv::transfer::p2p::{EngineConfig, P2pEngine, Secret, TcpDataPath};

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<String>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(b).into_owned());
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn refusals_are_rate_limited_in_the_log() {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink(lines.clone());
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish(),
    )
    .unwrap();
    let cons = P2pEngine::new(
        EngineConfig {
            secret: Some(Secret::new(b"s3cret".to_vec()).unwrap()),
            ..Default::default()
        },
        TcpDataPath,
    )
    .unwrap();
    // 300 peers without the secret: each is refused after its Hello.
    for _ in 0..300 {
        let mut s = TcpStream::connect(cons.listen_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let hello = Frame::Hello {
            version: PROTOCOL_VERSION,
            listen_addr: "127.0.0.1:9".into(),
            data_path: "tcp".into(),
            link_init: vec![],
            nonce: vec![1; 32],
            auth: false,
        };
        let _ = write_frame(&mut s, &hello);
        let _ = s.read(&mut [0u8; 1024]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let refused: Vec<String> = lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("refused a connection"))
        .cloned()
        .collect();
    // A burst of 5 per 10 s window; the run may straddle two windows.
    assert!(
        (1..=10).contains(&refused.len()),
        "{} lines for 300 refusals",
        refused.len()
    );
    assert!(
        refused[0].contains("has no shared secret"),
        "{}",
        refused[0]
    );
}
