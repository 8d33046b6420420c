//! The generic GPU layer (tensors, views and their checks, the stream-ordered allocation cache,
//! cross-stream ordering, stream switches, the communicator's argument checks and life cycle)
//! on a `GpuRuntime` whose "device" memory is host memory and whose streams run every call at
//! once (`common`). Each event record and stream wait is logged, so the tests see the ordering
//! the layer asks for. The collectives themselves run in `gpu_fake_nccl.rs`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{context, id, live_allocations, new_stream, take_fences, Flag, Host, DONE};
use dist_core::{
    Backend, DType, Device, DeviceCommunicator, DeviceKind, Error, HostTensor, ReduceOp, Result,
    Tensor,
};
use dist_nccl::{
    GpuBackend, GpuRuntime, GpuTensor, GpuView, GpuViewMut, NcclCommunicator, Options,
};

type Comm = NcclCommunicator<Host>;

/// One test: the runtime's state (allocations, fences, the cache) is process-wide.
#[test]
fn the_generic_gpu_layer_on_a_host_runtime() {
    let dev = Host::device(0).unwrap();
    let base = live_allocations();
    let on = |i| Device::new(DeviceKind::Cuda, i);

    // Tensors through the backend: round trips, re-views and device-side slices.
    type B = GpuBackend<Host>;
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        for shape in [vec![0usize, 3], vec![1], vec![3, 5, 7]] {
            let x = HostTensor::random(dtype, &shape, i as u64);
            let d = B::from_host(&x, on(1)).unwrap();
            assert_eq!((d.device(), B::to_host(&d).unwrap()), (on(1), x));
        }
    }
    let x = HostTensor::random(DType::F16, &[4, 6], 11);
    let d = B::from_host(&x, on(0)).unwrap();
    let r = B::reshape(d.clone(), &[3, 8]).unwrap();
    assert_eq!(r.ptr(), d.ptr());
    assert!(B::reshape(d.clone(), &[5, 5]).is_err());
    for (start, len) in [(0usize, 24usize), (5, 7), (24, 0)] {
        let got = B::to_host(&B::flat_slice(&d, start, len).unwrap()).unwrap();
        assert_eq!(
            got,
            dist_core::LocalBackend::flat_slice(&x, start, len).unwrap()
        );
    }
    assert!(B::flat_slice(&d, 20, 5).is_err() && B::from_host(&x, Device::CPU).is_err());
    assert!(GpuTensor::<Host>::zeros(&dev, DType::F64, &[usize::MAX / 4, 3]).is_err());
    drop((d, r));

    // Views: checked once when made, narrowed and reshaped without a copy, keeping what their
    // maker gave them until the last of them drops.
    let t = GpuTensor::<Host>::from_host(&HostTensor::random(DType::F32, &[24], 3), 0).unwrap();
    let other = new_stream();
    let shape = [4usize, 6];
    // SAFETY: t holds 96 bytes at t.ptr(), alive and unwritten while the views live.
    let v = unsafe { GpuView::from_raw_parts(&*dev, t.ptr(), 96, DType::F32, &shape, other) };
    let dropped = Arc::new(AtomicBool::new(false));
    let v = v.unwrap().keeping(Arc::new(Flag(dropped.clone())));
    assert_eq!((v.shape(), v.nbytes(), v.stream()), (&shape[..], 96, other));
    // SAFETY: as above (refused before anything could be read).
    let bad = unsafe { GpuView::from_raw_parts(&*dev, t.ptr(), 96, DType::F32, &[5, 6], other) };
    assert!(bad.unwrap_err().to_string().contains("needs 120 bytes"));
    // SAFETY: as above.
    let bad = unsafe { GpuView::from_raw_bytes(&*dev, t.ptr() + 2, DType::F32, 8, other) };
    assert!(bad.unwrap_err().to_string().contains("not aligned"));
    let part = v.narrow(6, 12).unwrap();
    assert!(v.narrow(20, 5).is_err() && v.narrow(usize::MAX, 2).is_err());
    drop(v);
    assert!(
        !dropped.load(Ordering::SeqCst),
        "the narrowed view keeps it"
    );

    // A copy between two streams runs on the output's, after the input's, which then waits.
    let mut out = GpuTensor::<Host>::zeros(&dev, DType::F32, &[12]).unwrap();
    take_fences();
    Comm::copy(&part, &mut out.view_mut()).unwrap();
    let own = id(dev.stream());
    let (o, around) = (id(other), |a, b| {
        vec![(true, a), (false, b), (true, b), (false, a)]
    });
    assert_eq!(take_fences(), around(o, own));
    let want = dist_core::LocalBackend::flat_slice(&t.to_host().unwrap(), 6, 12).unwrap();
    assert_eq!(out.to_host().unwrap(), want);
    assert!(
        Comm::copy(&t.view(), &mut out.view_mut()).is_err(),
        "24 elements into 12"
    );
    Comm::copy(&out.view(), &mut out.clone().view_mut()).unwrap();
    assert_eq!(take_fences(), vec![], "one stream: no event");
    drop(part);
    assert!(dropped.load(Ordering::SeqCst));

    // The cache is stream-ordered: a buffer last used on another stream is parked until an
    // event recorded there has completed, and only then handed out again.
    let buf = dist_nccl::DeviceBuffer::alloc(&dev, 4096).unwrap();
    let p = buf.ptr();
    DONE.store(false, Ordering::SeqCst);
    // SAFETY: a live stream of the device.
    unsafe { dev.pool().defer(buf, other) }.unwrap();
    assert_eq!((dev.pool().parked(), take_fences()), (1, vec![(true, o)]));
    let b2 = dist_nccl::DeviceBuffer::alloc(&dev, 4096).unwrap();
    assert_ne!(
        b2.ptr(),
        p,
        "not reused while the other stream may still use it"
    );
    DONE.store(true, Ordering::SeqCst);
    let b3 = dist_nccl::DeviceBuffer::alloc(&dev, 4096).unwrap();
    assert_eq!(
        (b3.ptr(), dev.pool().parked()),
        (p, 0),
        "reused once its event completed"
    );
    drop((b2, b3));

    // The communicator without NCCL: argument checks first, then Unsupported naming the op.
    let comm = Comm::new(
        &context(0),
        &Options {
            device: None,
            nccl: false,
        },
    )
    .unwrap();
    assert_eq!(comm.device(), on(0));
    assert!(!comm.has_nccl() && !comm.has_custom_ar());
    let e = comm.all_reduce(&t, ReduceOp::Sum).unwrap_err();
    assert!(
        e.to_string()
            .contains("tp:0 all_reduce: this communicator has no NCCL"),
        "{e}"
    );
    assert!(matches!(comm.all_gather(&t, 0), Err(Error::Unsupported(_))));
    let elsewhere = GpuTensor::<Host>::zeros(&Host::device(1).unwrap(), DType::F32, &[4]).unwrap();
    for bad in [
        comm.all_reduce(&elsewhere, ReduceOp::Sum).map(drop),
        comm.all_gather(&t, 3).map(drop),
        comm.broadcast(&mut t.clone().view_mut(), 1),
        comm.reduce_scatterv(&t, 0, &[60], ReduceOp::Sum).map(drop),
        comm.all_reduce_into(&t.view(), &mut out.view_mut(), ReduceOp::Sum),
        comm.send(&t.view(), 1),
    ] {
        assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
    }
    assert_eq!(
        take_fences(),
        vec![],
        "refused before any stream is touched"
    );

    // An engine's stream: ops are enqueued there (after what came before); views on the
    // device's own stream are fenced both ways, even around an op that fails.
    // SAFETY: `other` is a stream of the device that outlives the communicator's use.
    unsafe { comm.set_stream(other, Arc::new(())) }.unwrap();
    assert_eq!(
        (comm.stream(), take_fences()),
        (other, vec![(true, own), (false, o)])
    );
    assert!(comm
        .all_reduce_in_place(&mut t.clone().view_mut(), ReduceOp::Sum)
        .is_err());
    assert_eq!(take_fences(), around(own, o));
    // SAFETY: t holds 96 bytes; `other` is alive.
    let mut on_other = unsafe { GpuViewMut::from_raw_bytes(&*dev, t.ptr(), DType::F32, 96, other) };
    assert!(comm.broadcast(on_other.as_mut().unwrap(), 0).is_err());
    assert_eq!(
        take_fences(),
        vec![],
        "views on the communicator's stream: no event"
    );
    comm.synchronize().unwrap();
    comm.reset_stream().unwrap();
    assert_eq!(
        (comm.stream(), take_fences()),
        (dev.stream(), vec![(true, o), (false, own)])
    );

    // Graphs: a runtime that refuses capture is an error, and the closure never runs.
    let r = dist_nccl::GpuGraph::capture(&dev, || -> Result<()> { panic!("must not run") });
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");

    comm.destroy().unwrap();
    assert!(matches!(
        comm.all_reduce(&t, ReduceOp::Sum),
        Err(Error::NotInitialized(_))
    ));
    drop((comm, t, out, elsewhere, on_other));
    dev.empty_cache().unwrap();
    Host::device(1).unwrap().empty_cache().unwrap();
    assert_eq!(
        live_allocations(),
        base,
        "every buffer is freed (no leak, no double free)"
    );
}
