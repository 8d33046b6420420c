//! Fuzzes the store's state machine: bytes are dealt to three sessions over one store (each
//! chunk: a session byte, a length byte, then that many bytes), wakes are delivered after every
//! chunk. No panic; every pending wait of the store belongs to a live session that waits; once
//! every session is abandoned, no wait is left.
//!
//! Run: `cd crates/dist-store/fuzz && cargo +nightly fuzz run sessions`.
#![no_main]

use std::time::{Duration, Instant};

use dist_store::state::{ConnId, LocalStore, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = SessionConfig {
        token: (data.first() == Some(&0xA0)).then(|| b"t".to_vec()),
        max_pending_output: 4096,
        ..Default::default()
    };
    let now = Instant::now();
    let mut store = LocalStore::default();
    let mut sessions: Vec<Option<Session>> =
        (0..3).map(|i| Some(Session::new(ConnId(i), now))).collect();
    let mut rest = data;
    let mut t = now;
    while rest.len() >= 2 {
        let (who, len) = (rest[0] as usize % 3, rest[1] as usize);
        let chunk = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[(2 + len).min(rest.len())..];
        t += Duration::from_millis(1);
        let Some(s) = sessions[who].as_mut() else {
            continue;
        };
        s.receive(chunk, t);
        let r = s.process(&cfg, t, &mut store);
        // The peer reads everything (and so unblocks the output cap).
        let n = s.pending_output();
        s.sent(n);
        if r.is_err() || s.closing().is_some() {
            let mut s = sessions[who].take().expect("live");
            s.abandon(&mut store);
        }
        for w in std::mem::take(&mut store.wakes) {
            if let Some(s) = sessions[w.conn.0 as usize].as_mut() {
                assert!(s.on_wake(w.wait, &w.reply), "wake for a wait not pending");
                let _ = s.process(&cfg, t, &mut store);
            }
        }
        let waiting = sessions
            .iter()
            .flatten()
            .filter(|s| s.pending_wait().is_some())
            .count();
        assert_eq!(store.state.pending_waits(), waiting);
    }
    for s in sessions.iter_mut().flatten() {
        s.abandon(&mut store);
    }
    assert_eq!(store.state.pending_waits(), 0);
});
