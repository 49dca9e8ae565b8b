//! The power-loss file system itself (src/powerfs.rs): what survives a cut is what POSIX
//! makes durable, no more and no less. The power-loss test of cybd (powerloss.rs) relies on
//! these semantics, so they are checked here with plain system calls.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use cyb_tests::powerfs::{Options, PowerFs};
use cyb_tests::{is_root, require};

/// A powerfs on a temporary directory, or None (the skip said why) without root or FUSE.
fn mount() -> Option<(tempfile::TempDir, PowerFs)> {
    if !require(
        is_root() && Path::new("/dev/fuse").exists(),
        "root and /dev/fuse, to mount the power-loss file system",
    ) {
        return None;
    }
    let t = tempfile::Builder::new().prefix("cyb-powerfs-").tempdir().unwrap();
    let fs = PowerFs::mount(t.path(), Options::default()).expect("mount powerfs");
    Some((t, fs))
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

fn write(p: &Path, body: &[u8]) -> File {
    let mut f = OpenOptions::new().write(true).create_new(true).open(p).unwrap();
    f.write_all(body).unwrap();
    f
}

#[test]
fn only_what_was_synced_survives_a_cut() {
    let Some((_t, fs)) = mount() else { return };
    let m = fs.path();
    let dev = std::fs::metadata(m).unwrap().dev();

    // Name synced, data not: back empty (the issue's 0-byte files).
    write(&m.join(".c.tmp"), b"c");
    std::fs::rename(m.join(".c.tmp"), m.join("c")).unwrap();
    // Data synced before the rename, then the directory: whole.
    write(&m.join(".d.tmp"), b"d").sync_data().unwrap();
    std::fs::rename(m.join(".d.tmp"), m.join("d")).unwrap();
    // fsync through another descriptor of the same file (a dup, and a second open) counts:
    // durability is per inode.
    let e = write(&m.join("e"), b"e1");
    e.try_clone().unwrap().sync_data().unwrap();
    let f = write(&m.join("f"), b"f1");
    File::open(m.join("f")).unwrap().sync_data().unwrap();
    sync_dir(m);
    // Neither data nor name synced: gone.
    write(&m.join("a"), b"a");
    // Data synced, name not: gone as well (fsync of a file does not write its entry).
    write(&m.join("b"), b"b").sync_all().unwrap();
    // Written after the last sync: the old contents come back.
    (&e).write_all(b"e2").unwrap();
    (&f).write_all(b"f2").unwrap();
    let d_meta = std::fs::metadata(m.join("d")).unwrap();
    drop((e, f));

    fs.power_cut();
    let names: Vec<String> = std::fs::read_dir(m)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["c", "d", "e", "f"], "{names:?}");
    assert_eq!(std::fs::read(m.join("c")).unwrap(), b"");
    assert_eq!(std::fs::read(m.join("d")).unwrap(), b"d");
    assert_eq!(std::fs::read(m.join("e")).unwrap(), b"e1");
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"f1");
    // The disk keeps its device number and inode numbers and times across the cut.
    let after = std::fs::metadata(m.join("d")).unwrap();
    assert_eq!(std::fs::metadata(m).unwrap().dev(), dev);
    assert_eq!(
        (after.ino(), after.mtime(), after.mtime_nsec(), after.nlink()),
        (d_meta.ino(), d_meta.mtime(), d_meta.mtime_nsec(), 1)
    );
    let s = fs.stats();
    assert_eq!(s.power_cuts, 1);
    // Lost: the names a and b; the data of a, c, e and f.
    assert_eq!((s.lost_names, s.lost_data), (2, 4), "{s:?}");
}

#[test]
fn renames_unlinks_and_exchanges_are_durable_at_the_directory_fsync() {
    let Some((_t, fs)) = mount() else { return };
    let m = fs.path();
    for (n, body) in [("x", b"x" as &[u8]), ("y", b"y"), ("gone", b"g"), ("kept", b"k")] {
        write(&m.join(n), body).sync_all().unwrap();
    }
    sync_dir(m);
    // Exchanged and unlinked, then cut before the directory fsync: undone.
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &m.join("x"),
        nix::fcntl::AT_FDCWD,
        &m.join("y"),
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    std::fs::remove_file(m.join("gone")).unwrap();
    let kept = std::fs::metadata(m.join("kept")).unwrap();
    std::fs::rename(m.join("kept"), m.join("moved")).unwrap();
    fs.power_cut();
    assert_eq!(std::fs::read(m.join("x")).unwrap(), b"x");
    assert_eq!(std::fs::read(m.join("y")).unwrap(), b"y");
    assert_eq!(std::fs::read(m.join("gone")).unwrap(), b"g");
    assert!(!m.join("moved").exists());
    // The file that comes back is the same inode, with the same times.
    let back = std::fs::metadata(m.join("kept")).unwrap();
    assert_eq!((back.ino(), back.mtime_nsec()), (kept.ino(), kept.mtime_nsec()));

    // The same, with the directory fsynced: done, the exchange as one.
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &m.join("x"),
        nix::fcntl::AT_FDCWD,
        &m.join("y"),
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    std::fs::remove_file(m.join("gone")).unwrap();
    sync_dir(m);
    fs.power_cut();
    assert_eq!(std::fs::read(m.join("x")).unwrap(), b"y");
    assert_eq!(std::fs::read(m.join("y")).unwrap(), b"x");
    assert!(!m.join("gone").exists());
}

#[test]
fn a_new_directory_needs_its_parent_synced() {
    let Some((_t, fs)) = mount() else { return };
    let m = fs.path();
    std::fs::create_dir(m.join("sub")).unwrap();
    write(&m.join("sub/r"), b"r").sync_all().unwrap();
    sync_dir(&m.join("sub"));
    fs.power_cut();
    assert!(!m.join("sub").exists(), "the parent of sub/ was never synced");

    std::fs::create_dir(m.join("sub")).unwrap();
    write(&m.join("sub/r"), b"r").sync_all().unwrap();
    sync_dir(&m.join("sub"));
    sync_dir(m);
    fs.power_cut();
    assert_eq!(std::fs::read(m.join("sub/r")).unwrap(), b"r");
    assert_eq!(std::fs::metadata(m).unwrap().nlink(), 3);
}

/// A process that lives on across the cut (which a real power cut does not allow) finds
/// the inodes it had open gone: its fsync fails instead of reporting data it lost as
/// written. LazyFS answers such an fsync with success (see powerloss.rs).
#[test]
fn a_descriptor_of_a_lost_file_fails_after_the_cut() {
    let Some((_t, fs)) = mount() else { return };
    let m = fs.path();
    let f = write(&m.join(".t.tmp"), b"lost");
    fs.power_cut();
    let err = f.sync_data().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    assert!(std::fs::rename(m.join(".t.tmp"), m.join("t")).is_err());
}

#[test]
fn a_remount_keeps_the_durable_image_and_inode_numbers_under_a_new_device_number() {
    let Some((_t, mut fs)) = mount() else { return };
    let m = fs.path().to_path_buf();
    write(&m.join("kept"), b"k").sync_all().unwrap();
    write(&m.join("lost"), b"l");
    sync_dir(&m);
    (&File::options().append(true).open(m.join("lost")).unwrap())
        .write_all(b"x")
        .unwrap();
    let before = std::fs::metadata(m.join("kept")).unwrap();
    fs.power_cut_and_remount().unwrap();
    let after = std::fs::metadata(m.join("kept")).unwrap();
    assert_ne!(
        after.dev(),
        before.dev(),
        "the remount has a device number of its own"
    );
    assert_eq!(
        (after.ino(), after.mtime_nsec()),
        (before.ino(), before.mtime_nsec())
    );
    assert_eq!(std::fs::read(m.join("kept")).unwrap(), b"k");
    assert_eq!(std::fs::read(m.join("lost")).unwrap(), b"");
    write(&m.join("new"), b"n");
    assert_eq!(std::fs::read(m.join("new")).unwrap(), b"n");
}
