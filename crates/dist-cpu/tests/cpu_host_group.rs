//! The shared-memory host group: every `HostGroup` operation, typed objects through
//! `HostGroupExt`, large messages, caps, at world sizes 1 to 8 with ranks as threads.

use std::time::Duration;

use dist_core::local::run_threads;
use dist_core::{DType, Error, HostGroup, HostGroupExt, HostTensor};
use dist_cpu::ShmHostGroup;

const T: Duration = Duration::from_secs(60);

#[test]
fn every_operation_at_every_world_size() {
    for world in [1usize, 2, 3, 4, 8] {
        let out = run_threads(world, T, |r, boot| {
            let g = ShmHostGroup::new(&boot, &format!("hg{world}"), T).unwrap();
            assert_eq!((g.rank(), g.world_size()), (r, world));
            g.barrier().unwrap();
            for src in 0..world {
                let v: Vec<u64> = (0..=src as u64).map(|x| x * 3).collect();
                let got: Vec<u64> = g.broadcast_obj((r == src).then_some(&v), src).unwrap();
                assert_eq!(got, v);
            }
            let all: Vec<(usize, String)> = g.all_gather_obj(&(r, "x".repeat(r))).unwrap();
            assert_eq!(
                all,
                (0..world).map(|q| (q, "x".repeat(q))).collect::<Vec<_>>()
            );
            let gathered = g.gather_obj(&(r as u32), world - 1).unwrap();
            assert_eq!(gathered.is_some(), r == world - 1);
            // Everyone (this rank too) sends three messages to rank 0; then a ring.
            for i in 0..3u32 {
                g.send_obj(&(r, i), 0).unwrap();
            }
            if r == 0 {
                for src in (0..world).rev() {
                    for i in 0..3u32 {
                        let got: (usize, u32) = g.recv_obj(src).unwrap();
                        assert_eq!(got, (src, i));
                    }
                }
            }
            let (next, prev) = ((r + 1) % world, (r + world - 1) % world);
            g.send_obj(&format!("from {r}"), next).unwrap();
            let got: String = g.recv_obj(prev).unwrap();
            assert_eq!(got, format!("from {prev}"));
            // Large bytes: 1 MiB + 3 through broadcast and all_gather (random data).
            let big = HostTensor::random(DType::U8, &[(1 << 20) + 3], r as u64);
            let b = g
                .broadcast_bytes((r == 0).then_some(big.as_bytes()), 0)
                .unwrap();
            assert_eq!(
                b,
                HostTensor::random(DType::U8, &[(1 << 20) + 3], 0).as_bytes()
            );
            let all = g.all_gather_bytes(&big.as_bytes()[..r * 1000]).unwrap();
            for (q, a) in all.iter().enumerate() {
                let want = HostTensor::random(DType::U8, &[(1 << 20) + 3], q as u64);
                assert_eq!(a.as_slice(), &want.as_bytes()[..q * 1000]);
            }
            g.barrier().unwrap();
        });
        for (r, o) in out.into_iter().enumerate() {
            assert!(o.is_ok(), "world {world} rank {r} panicked");
        }
    }
}

#[test]
fn oversized_messages_are_refused_before_allocation() {
    let out = run_threads(2, T, |r, boot| {
        let g = ShmHostGroup::new(&boot, "hgcap", T)
            .unwrap()
            .with_max_object_bytes(100);
        let e = g.send_bytes(&[0u8; 101], 1 - r).unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        let e = g.all_gather_bytes(&[0u8; 101]).unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        // A peer with a larger cap sends too much: the receiver refuses it (and stays in step).
        if r == 0 {
            let big = ShmHostGroup::new(&boot, "hgcap2", T).unwrap();
            big.send_bytes(&[7u8; 500], 1).unwrap();
            big.send_bytes(&[8u8; 5], 1).unwrap();
        } else {
            let small = ShmHostGroup::new(&boot, "hgcap2", T)
                .unwrap()
                .with_max_object_bytes(100);
            assert!(small.recv_bytes(0).is_err());
            assert_eq!(small.recv_bytes(0).unwrap(), vec![8u8; 5]);
        }
        assert!(g.recv_bytes(r).is_err(), "nothing was sent to self");
    });
    for o in out {
        assert!(o.is_ok());
    }
}
