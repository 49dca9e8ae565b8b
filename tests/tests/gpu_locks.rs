//! GPU inventory and per-GPU lockfiles on the real host: device nodes made with mknod, the
//! absent NVML library, and locks taken by util-linux `flock`, by this process and by a
//! child that inherits the locked descriptor.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cyb_proto::gpu::LockInfo;
use cyb_tests::{have, is_root, outside_can_lock, require, wait_until};
use cybd::gpu::{
    self, DeviceNode, GpuConfig, GpuLocks, GpuSource, GpusSection, Holder, Inventory, InventorySource,
    LockStatus, StaticGpu,
};

fn entry(index: u32, devices: Vec<PathBuf>) -> StaticGpu {
    StaticGpu {
        index,
        uuid: Some(format!("GPU-test-{index}")),
        name: Some("Test GPU".into()),
        devices,
    }
}

#[test]
fn static_inventory_reports_device_numbers() {
    if !require(is_root(), "root (mknod of GPU device nodes)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    cyb_tests::mknod_char(&d.join("nvidia0"), 195, 0, 0o600);
    cyb_tests::mknod_char(&d.join("nvidia1"), 195, 1, 0o600);
    cyb_tests::mknod_char(&d.join("nvidiactl"), 195, 255, 0o600);
    let cfg = GpuConfig::resolve(
        GpusSection {
            source: GpuSource::Static,
            allow_shared: false,
            common_devices: Some(vec![d.join("nvidiactl"), d.join("nvidia-uvm")]),
        },
        vec![
            entry(1, vec![d.join("nvidia1")]),
            entry(0, vec![d.join("nvidia0")]),
            entry(2, vec![d.join("nvidia2")]),
        ],
    )
    .unwrap();
    let (inv, health) = Inventory::load(&cfg);
    assert_eq!(inv.source, InventorySource::Static);
    assert_eq!(
        health,
        format!(
            "static: 3 GPUs from the config, 1 unusable (gpu 2: device node {} is missing)",
            d.join("nvidia2").display()
        )
    );
    let nums = |i: u32| {
        let g = inv.gpu(i).unwrap();
        g.devices.iter().map(|n| (n.major, n.minor)).collect::<Vec<_>>()
    };
    assert_eq!(nums(0), vec![(195, 0)]);
    assert_eq!(nums(1), vec![(195, 1)]);
    assert!(inv.gpu(0).unwrap().usable() && inv.gpu(1).unwrap().usable());
    assert!(!inv.gpu(2).unwrap().usable());
    assert_eq!(
        inv.common_devices,
        vec![DeviceNode {
            path: d.join("nvidiactl"),
            major: 195,
            minor: 255
        }]
    );
    assert_eq!(inv.missing_common, vec![d.join("nvidia-uvm")]);
    let allow: Vec<(u32, u32)> = inv.job_devices(&[1]).iter().map(|n| (n.major, n.minor)).collect();
    assert_eq!(allow, vec![(195, 1), (195, 255)]);
    assert_eq!(inv.visible_devices(&[0, 1]), "GPU-test-0,GPU-test-1");

    // Allocation takes the usable ones only, lowest first.
    let locks = GpuLocks::for_runtime(&d.join("run"));
    let h = Holder::new(11, "root");
    let leases = gpu::allocate(&inv, &locks, 2, &h, false).unwrap().unwrap();
    assert_eq!(leases.iter().map(|l| l.index()).collect::<Vec<_>>(), vec![0, 1]);
    assert!(gpu::allocate(&inv, &locks, 1, &h, false).unwrap().is_none());

    let report = gpu::report(&inv, &locks);
    assert_eq!(report.source, "static");
    assert_eq!(report.gpus.len(), 3);
    assert_eq!(
        report.gpus[0].lock,
        LockInfo::Job {
            job_id: 11,
            user: "root".into(),
            pid: std::process::id()
        }
    );
    assert_eq!(report.gpus[2].lock, LockInfo::Free);
    assert_eq!(
        report.gpus[1].devices,
        vec![d.join("nvidia1").display().to_string()]
    );
    let table = cyb_proto::gpu::render_table(&report);
    println!("{table}");
    assert!(table.contains("is missing"), "{table}");
}

#[test]
fn no_nvml_means_no_gpus_not_a_crash() {
    for source in [GpuSource::Nvml, GpuSource::Auto] {
        let cfg = GpuConfig {
            source,
            ..GpuConfig::default()
        };
        let (inv, health) = Inventory::load(&cfg);
        if inv.nvml_loaded() {
            // A host with the NVIDIA driver: NVML gives the inventory.
            println!("NVML is present: {health}");
            assert_eq!(inv.source, InventorySource::Nvml);
            assert!(health.starts_with("nvml: "), "{health}");
            continue;
        }
        assert!(inv.gpus.is_empty());
        assert_eq!(inv.source, InventorySource::None);
        assert_eq!(
            health,
            "nvml: libnvidia-ml.so.1 not found (no NVIDIA driver); 0 GPUs"
        );
        let tmp = tempfile::tempdir().unwrap();
        let report = gpu::report(&inv, &GpuLocks::for_runtime(tmp.path()));
        assert!(report.gpus.is_empty());
        assert_eq!(report.health, health);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["gpus"], serde_json::json!([]));
    }
}

#[test]
fn a_held_lock_cannot_be_taken_twice() {
    if !require(have("flock"), "util-linux flock") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let locks = GpuLocks::for_runtime(tmp.path());
    let lease = locks.try_acquire(0, &Holder::new(1, "alice")).unwrap().unwrap();
    assert!(locks.try_acquire(0, &Holder::new(2, "bob")).unwrap().is_none());
    assert!(!outside_can_lock(lease.path()), "flock(1) must see the lock");
    drop(lease);
    assert!(outside_can_lock(&locks.path(0)));
    assert!(locks.try_acquire(0, &Holder::new(2, "bob")).unwrap().is_some());
}

#[test]
fn an_outside_flock_is_respected() {
    if !require(have("flock"), "util-linux flock") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let locks = GpuLocks::for_runtime(tmp.path());
    locks.prepare([0]).unwrap();
    let path = locks.path(0);
    // Text left by an earlier cybd job, naming a live process (this one) that does not hold
    // the lock: it must not make the outside holder look like cybd's.
    std::fs::write(&path, Holder::new(41, "old").to_line()).unwrap();
    assert_eq!(locks.status(0).unwrap(), LockStatus::Free);
    let mut child = Command::new("flock")
        .arg("-x")
        .arg(&path)
        .args(["sleep", "3"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn flock");
    let held = wait_until(Duration::from_secs(5), || {
        !matches!(locks.status(0), Ok(LockStatus::Free))
    });
    assert!(held, "flock(1) did not take the lock");
    assert_eq!(locks.status(0).unwrap(), LockStatus::HeldOutside);
    assert!(locks.try_acquire(0, &Holder::new(42, "alice")).unwrap().is_none());
    let inv = Inventory::from_gpus(vec![cybd::gpu::Gpu::new(0)]);
    assert!(
        gpu::allocate(&inv, &locks, 1, &Holder::new(42, "alice"), false)
            .unwrap()
            .is_none()
    );
    assert_eq!(gpu::report(&inv, &locks).gpus[0].lock, LockInfo::Outside);
    assert!(locks.try_acquire(0, &Holder::new(42, "alice")).unwrap().is_none());
    let st = child.wait().unwrap();
    assert!(st.success(), "flock sleep: {st}");
    assert_eq!(locks.status(0).unwrap(), LockStatus::Free);
    let lease = locks.try_acquire(0, &Holder::new(42, "alice")).unwrap().unwrap();
    assert_eq!(lease.holder().job_id, 42);
}

#[test]
fn an_inherited_lock_outlives_the_parent_descriptor() {
    if !require(have("flock"), "util-linux flock") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let locks = GpuLocks::for_runtime(tmp.path());
    let mut lease = locks.try_acquire(3, &Holder::new(7, "alice")).unwrap().unwrap();
    let fd = lease.as_fd().as_raw_fd();
    // The child keeps the same descriptor number, with close-on-exec cleared after fork
    // (what the daemon does for a supervisor).
    let mut cmd = Command::new("sleep");
    cmd.arg("30").stdin(Stdio::null());
    // SAFETY: only fcntl, which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn sleep");
    let pid = child.id();
    lease.set_pid(pid).unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}/fd/{fd}")).exists(),
        "the child did not inherit fd {fd}"
    );
    let file = lease.into_file();
    drop(file);
    // The parent has no descriptor left; the child's keeps the lock, and is cybd's holder.
    match locks.status(3).unwrap() {
        LockStatus::HeldByCyb(h) => {
            assert_eq!((h.job_id, h.pid, h.user.as_str()), (7, pid, "alice"));
        }
        other => panic!("expected the child to hold the lock as cybd's, got {other:?}"),
    }
    assert!(locks.try_acquire(3, &Holder::new(8, "bob")).unwrap().is_none());
    assert!(!outside_can_lock(&locks.path(3)));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        locks.status(3).unwrap(),
        LockStatus::Free,
        "released when the child exits"
    );
    assert!(outside_can_lock(&locks.path(3)));
    assert!(locks.try_acquire(3, &Holder::new(8, "bob")).unwrap().is_some());
}

#[test]
fn stale_holder_text_with_nobody_holding_is_free() {
    let tmp = tempfile::tempdir().unwrap();
    let locks = GpuLocks::for_runtime(tmp.path());
    locks.prepare([0, 1]).unwrap();
    // One naming this (live) process, one naming a process that has exited.
    std::fs::write(locks.path(0), Holder::new(5, "alice").to_line()).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let mut h = Holder::new(6, "bob");
    h.pid = gone.id();
    std::fs::write(locks.path(1), h.to_line()).unwrap();
    for i in [0, 1] {
        assert_eq!(locks.status(i).unwrap(), LockStatus::Free);
    }
    let lease = locks.try_acquire(1, &Holder::new(9, "carol")).unwrap().unwrap();
    let text = std::fs::read(lease.path()).unwrap();
    assert_eq!(Holder::parse(&text).map(|h| h.job_id), Some(9));
}
