//! powerfs: an in-memory FUSE file system that simulates power loss, for tests that check
//! what survives a power cut (after LazyFS, which the package registries do not carry).
//!
//! It keeps two images of one tree: the **live** one, which every system call sees and
//! changes, and the **durable** one, what a disk would hold after the power went. Only the
//! calls that POSIX makes durable move state from the first to the second, per inode, never
//! per descriptor (a real kernel's fsync on any descriptor of a file writes that file):
//!
//! - `fsync`/`fdatasync` of a file: its data (and size) become durable; `fsync` also its
//!   attributes (mode, owner, times). Not its name: a new file reached only through an
//!   unsynced directory entry is lost whole.
//! - `fsync` of a directory: its entries become durable as they are, all at once: creations,
//!   unlinks, hard links and renames into, out of and within it, `RENAME_EXCHANGE` of two
//!   of its names included. A file that becomes reachable this way without its data having
//!   been synced comes back empty, as on a real disk.
//! - Optionally ([`Options::writeback`]), a directory's entries are also written back at
//!   random moments without being asked, as a kernel's own writeback or a journal commit
//!   may do. That catches code that relies on a rename *not* reaching the disk before the
//!   data it names (rename first, fsync the data later).
//!
//! - Optionally ([`Options::refuse_exchange`]), `renameat2` flags are refused with `EINVAL`,
//!   as LazyFS refuses them.
//!
//! [`PowerFs::power_cut`] throws the live image away and makes the mount show the durable
//! one. The mount itself stays, so the file system keeps its device number and inodes keep
//! their numbers, as a disk's do across a reboot. Entries and attributes are never cached
//! by the kernel (time-outs of zero) and files are opened with direct I/O (no page cache),
//! so after a cut the next system call sees the durable image.
//!
//! A faithful power cut stops every process that writes to the mount first: kill them and
//! wait until they are gone, then cut. A process that lives on across a cut keeps
//! descriptors of inodes the disk never held; its calls on them fail with `ESTALE`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Nothing the kernel learns from us is cached: every call asks again.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

/// How a [`PowerFs`] behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Probability that a change to a directory also writes the directory's entries back
    /// at once, unasked (0 never: only fsync makes anything durable).
    pub writeback: f64,
    /// Seed of the random choices (0: from the clock).
    pub seed: u64,
    /// Refuse `renameat2` flags with `EINVAL`, as LazyFS does, so callers take their
    /// fallback (a plain rename).
    pub refuse_exchange: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            writeback: 0.0,
            seed: 0,
            refuse_exchange: false,
        }
    }
}

/// What a [`PowerFs`] has done so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub fsyncs: u64,
    pub fdatasyncs: u64,
    pub dir_syncs: u64,
    /// `renameat2(RENAME_EXCHANGE)` calls that swapped two names.
    pub exchanges: u64,
    /// Directories written back unasked ([`Options::writeback`]).
    pub writebacks: u64,
    pub power_cuts: u64,
    /// Over all cuts: directory entries that existed only in the live image.
    pub lost_names: u64,
    /// Over all cuts: files whose live data differed from their durable data.
    pub lost_data: u64,
}

#[derive(Clone, Debug)]
struct Meta {
    kind: FileType,
    /// Permission bits, with setuid, setgid and sticky.
    perm: u16,
    uid: u32,
    gid: u32,
    rdev: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

#[derive(Clone, Debug, PartialEq)]
enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, u64>),
    Link(PathBuf),
    /// Fifos, sockets, device nodes: nothing but attributes.
    Other,
}

#[derive(Clone, Debug)]
struct Node {
    meta: Meta,
    nlink: u32,
    body: Body,
}

impl Node {
    fn size(&self) -> u64 {
        match &self.body {
            Body::File(d) => d.len() as u64,
            Body::Dir(e) => e.len() as u64,
            Body::Link(t) => t.as_os_str().len() as u64,
            Body::Other => 0,
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let size = self.size();
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.meta.atime,
            mtime: self.meta.mtime,
            ctime: self.meta.ctime,
            crtime: self.meta.ctime,
            kind: self.meta.kind,
            perm: self.meta.perm,
            nlink: self.nlink,
            uid: self.meta.uid,
            gid: self.meta.gid,
            rdev: self.meta.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    /// What a disk holds of this inode when only a directory entry naming it was synced:
    /// its attributes, none of its data.
    fn skeleton(&self) -> Node {
        let body = match &self.body {
            Body::File(_) => Body::File(Vec::new()),
            Body::Dir(_) => Body::Dir(BTreeMap::new()),
            other => other.clone(),
        };
        Node {
            meta: self.meta.clone(),
            nlink: self.nlink,
            body,
        }
    }
}

type Image = HashMap<u64, Node>;

struct State {
    live: Image,
    durable: Image,
    /// Never reset by a cut: the kernel may still know an inode number of the lost image.
    next_ino: u64,
    next_fh: u64,
    /// Directory listings, taken when a directory is opened (or read from the start).
    listings: HashMap<u64, Vec<(u64, FileType, OsString)>>,
    opts: Options,
    rng: u64,
    stats: Stats,
}

type Res<T> = Result<T, Errno>;

impl State {
    fn new(opts: Options) -> State {
        let now = SystemTime::now();
        let root = Node {
            meta: Meta {
                kind: FileType::Directory,
                perm: 0o755,
                uid: 0,
                gid: 0,
                rdev: 0,
                atime: now,
                mtime: now,
                ctime: now,
            },
            nlink: 2,
            body: Body::Dir(BTreeMap::new()),
        };
        let live: Image = [(ROOT, root)].into_iter().collect();
        let seed = if opts.seed != 0 {
            opts.seed
        } else {
            now.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        };
        State {
            durable: live.clone(),
            live,
            next_ino: ROOT + 1,
            next_fh: 1,
            listings: HashMap::new(),
            opts,
            rng: seed,
            stats: Stats::default(),
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn node(&self, ino: u64) -> Res<&Node> {
        self.live.get(&ino).ok_or(Errno::ESTALE)
    }

    fn node_mut(&mut self, ino: u64) -> Res<&mut Node> {
        self.live.get_mut(&ino).ok_or(Errno::ESTALE)
    }

    fn entries(&self, dir: u64) -> Res<&BTreeMap<OsString, u64>> {
        match &self.node(dir)?.body {
            Body::Dir(e) => Ok(e),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Res<&mut BTreeMap<OsString, u64>> {
        match &mut self.node_mut(dir)?.body {
            Body::Dir(e) => Ok(e),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn child(&self, dir: u64, name: &OsStr) -> Res<Option<u64>> {
        Ok(self.entries(dir)?.get(name).copied())
    }

    fn is_dir(&self, ino: u64) -> bool {
        self.live
            .get(&ino)
            .is_some_and(|n| matches!(n.body, Body::Dir(_)))
    }

    /// A directory changed: its times, and maybe an unasked write-back.
    fn dir_changed(&mut self, dir: u64) {
        let now = SystemTime::now();
        if let Some(n) = self.live.get_mut(&dir) {
            n.meta.mtime = now;
            n.meta.ctime = now;
        }
        let p = self.opts.writeback;
        if self.chance(p) {
            self.stats.writebacks += 1;
            self.persist_dir(dir);
        }
    }

    /// Makes a new node named `name` in `parent`, owned by the caller.
    fn make(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        kind: FileType,
        mode: u32,
        body: Body,
    ) -> Res<FileAttr> {
        if name.len() > 255 {
            return Err(Errno::from_i32(libc::ENAMETOOLONG));
        }
        if self.child(parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let (pgid, pperm) = {
            let p = &self.node(parent)?.meta;
            (p.gid, p.perm)
        };
        let setgid_dir = pperm & 0o2000 != 0;
        let mut perm = (mode & 0o7777) as u16;
        if setgid_dir && kind == FileType::Directory {
            perm |= 0o2000;
        }
        let now = SystemTime::now();
        let node = Node {
            meta: Meta {
                kind,
                perm,
                uid: req.uid(),
                gid: if setgid_dir { pgid } else { req.gid() },
                rdev: 0,
                atime: now,
                mtime: now,
                ctime: now,
            },
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            body,
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        let attr = node.attr(ino);
        self.live.insert(ino, node);
        self.entries_mut(parent)?.insert(name.to_os_string(), ino);
        if kind == FileType::Directory {
            self.node_mut(parent)?.nlink += 1;
        }
        self.dir_changed(parent);
        Ok(attr)
    }

    /// Drops one link of `ino` (its entry is already gone).
    fn unlinked(&mut self, ino: u64, parent: u64) {
        let now = SystemTime::now();
        let was_dir = self.is_dir(ino);
        if let Some(n) = self.live.get_mut(&ino) {
            n.nlink = if was_dir { 0 } else { n.nlink.saturating_sub(1) };
            n.meta.ctime = now;
        }
        if was_dir && let Some(p) = self.live.get_mut(&parent) {
            p.nlink = p.nlink.saturating_sub(1);
        }
    }

    fn unlink(&mut self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        let ino = self.child(parent, name)?.ok_or(Errno::ENOENT)?;
        match (dir, self.is_dir(ino)) {
            (false, true) => return Err(Errno::EISDIR),
            (true, false) => return Err(Errno::ENOTDIR),
            (true, true) if !self.entries(ino)?.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.entries_mut(parent)?.remove(name);
        self.unlinked(ino, parent);
        self.dir_changed(parent);
        Ok(())
    }

    fn rename(
        &mut self,
        from_dir: u64,
        from: &OsStr,
        to_dir: u64,
        to: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        let src = self.child(from_dir, from)?.ok_or(Errno::ENOENT)?;
        let dst = self.child(to_dir, to)?;
        if flags.contains(RenameFlags::RENAME_WHITEOUT) || (self.opts.refuse_exchange && !flags.is_empty()) {
            return Err(Errno::EINVAL);
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EINVAL);
            }
            let dst = dst.ok_or(Errno::ENOENT)?;
            self.entries_mut(from_dir)?.insert(from.to_os_string(), dst);
            self.entries_mut(to_dir)?.insert(to.to_os_string(), src);
            if from_dir != to_dir {
                // A directory moved to the other parent takes its ".." link with it.
                let (a, b) = (self.is_dir(src), self.is_dir(dst));
                if a != b {
                    let (gains, loses) = if a { (to_dir, from_dir) } else { (from_dir, to_dir) };
                    self.node_mut(gains)?.nlink += 1;
                    let l = self.node_mut(loses)?;
                    l.nlink = l.nlink.saturating_sub(1);
                }
            }
            self.touch_ctime(src);
            self.touch_ctime(dst);
            self.stats.exchanges += 1;
            self.dir_changed(from_dir);
            if to_dir != from_dir {
                self.dir_changed(to_dir);
            }
            return Ok(());
        }
        if let Some(dst) = dst {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            if dst == src {
                // Two links of one inode: POSIX says do nothing.
                return Ok(());
            }
            match (self.is_dir(src), self.is_dir(dst)) {
                (false, true) => return Err(Errno::EISDIR),
                (true, false) => return Err(Errno::ENOTDIR),
                (true, true) if !self.entries(dst)?.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        if self.is_dir(src) && self.is_ancestor(src, to_dir) {
            return Err(Errno::EINVAL);
        }
        self.entries_mut(from_dir)?.remove(from);
        self.entries_mut(to_dir)?.insert(to.to_os_string(), src);
        if let Some(dst) = dst {
            self.unlinked(dst, to_dir);
        }
        if self.is_dir(src) && from_dir != to_dir {
            self.node_mut(to_dir)?.nlink += 1;
            let f = self.node_mut(from_dir)?;
            f.nlink = f.nlink.saturating_sub(1);
        }
        self.touch_ctime(src);
        self.dir_changed(from_dir);
        if to_dir != from_dir {
            self.dir_changed(to_dir);
        }
        Ok(())
    }

    /// Whether directory `a` is `b` or above it in the live tree.
    fn is_ancestor(&self, a: u64, b: u64) -> bool {
        if a == b {
            return true;
        }
        let mut stack = vec![a];
        let mut seen = HashSet::new();
        while let Some(d) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            if let Ok(e) = self.entries(d) {
                for &c in e.values() {
                    if c == b {
                        return true;
                    }
                    if self.is_dir(c) {
                        stack.push(c);
                    }
                }
            }
        }
        false
    }

    fn touch_ctime(&mut self, ino: u64) {
        if let Some(n) = self.live.get_mut(&ino) {
            n.meta.ctime = SystemTime::now();
        }
    }

    /// fsync/fdatasync of `ino`: its data, and with `all` its attributes, become durable.
    fn persist_file(&mut self, ino: u64, all: bool) -> Res<()> {
        let live = self.node(ino)?.clone();
        if matches!(live.body, Body::Dir(_)) {
            self.persist_dir(ino);
            return Ok(());
        }
        match self.durable.get_mut(&ino) {
            Some(d) => {
                d.body = live.body;
                if all {
                    d.meta = live.meta;
                }
            }
            None => {
                self.durable.insert(ino, live);
            }
        }
        Ok(())
    }

    /// fsync of directory `dir`: its entries become durable, all at once; what they name
    /// exists on the disk from then on, empty where its data was never synced.
    fn persist_dir(&mut self, dir: u64) {
        let Some(live) = self.live.get(&dir) else { return };
        let Body::Dir(entries) = &live.body else { return };
        for ino in entries.values() {
            if !self.durable.contains_key(ino)
                && let Some(n) = self.live.get(ino)
            {
                self.durable.insert(*ino, n.skeleton());
            }
        }
        let meta = live.meta.clone();
        let body = live.body.clone();
        match self.durable.get_mut(&dir) {
            Some(d) => {
                d.meta = meta;
                d.body = body;
            }
            None => {
                self.durable.insert(dir, Node { meta, nlink: 2, body });
            }
        }
    }

    /// The power goes: the live image is replaced by the durable one.
    fn power_cut(&mut self) {
        // Figures first: what is about to be lost.
        for (ino, n) in &self.live {
            match &n.body {
                Body::Dir(e) => {
                    let durable = match self.durable.get(ino).map(|d| &d.body) {
                        Some(Body::Dir(d)) => Some(d),
                        _ => None,
                    };
                    self.stats.lost_names += e
                        .iter()
                        .filter(|(name, c)| durable.and_then(|d| d.get(*name)) != Some(c))
                        .count() as u64;
                }
                Body::File(data)
                    if n.nlink > 0
                        && !matches!(self.durable.get(ino).map(|d| &d.body),
                            Some(Body::File(d)) if d == data) =>
                {
                    self.stats.lost_data += 1;
                }
                _ => {}
            }
        }
        // What no durable entry reaches is gone (an unlinked file, a file never named).
        let mut reached = HashSet::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if !reached.insert(ino) {
                continue;
            }
            if let Some(Node {
                body: Body::Dir(e), ..
            }) = self.durable.get(&ino)
            {
                stack.extend(e.values().copied());
            }
        }
        self.durable.retain(|ino, _| reached.contains(ino));
        // Link counts as the durable entries have them.
        let mut links: HashMap<u64, u32> = HashMap::new();
        for n in self.durable.values() {
            if let Body::Dir(e) = &n.body {
                for c in e.values() {
                    *links.entry(*c).or_default() += 1;
                }
            }
        }
        let subdirs: HashMap<u64, u32> = self
            .durable
            .iter()
            .filter_map(|(ino, n)| match &n.body {
                Body::Dir(e) => Some((
                    *ino,
                    e.values()
                        .filter(|c| {
                            self.durable
                                .get(c)
                                .is_some_and(|n| matches!(n.body, Body::Dir(_)))
                        })
                        .count() as u32,
                )),
                _ => None,
            })
            .collect();
        for (ino, n) in self.durable.iter_mut() {
            n.nlink = match subdirs.get(ino) {
                Some(s) => 2 + s,
                None => links.get(ino).copied().unwrap_or(0),
            };
        }
        self.live = self.durable.clone();
        self.listings.clear();
        self.stats.power_cuts += 1;
    }
}

/// The file system the FUSE session serves.
struct Fs {
    state: Arc<Mutex<State>>,
}

impl Fs {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn done(reply: ReplyEmpty, r: Res<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn entry(reply: ReplyEntry, r: Res<FileAttr>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn time_of(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl fuser::Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.lock();
        let r = s
            .child(parent.0, name)
            .and_then(|c| c.ok_or(Errno::ENOENT))
            .and_then(|ino| Ok(s.node(ino)?.attr(ino)));
        entry(reply, r);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.lock();
        match s.node(ino.0) {
            Ok(n) => reply.attr(&TTL, &n.attr(ino.0)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        let r = (|| {
            let n = s.node_mut(ino.0)?;
            let now = SystemTime::now();
            if let Some(size) = size {
                let Body::File(data) = &mut n.body else {
                    return Err(Errno::EISDIR);
                };
                data.resize(usize::try_from(size).map_err(|_| Errno::EINVAL)?, 0);
                n.meta.mtime = now;
            }
            if let Some(m) = mode {
                n.meta.perm = (m & 0o7777) as u16;
            }
            if let Some(u) = uid {
                n.meta.uid = u;
            }
            if let Some(g) = gid {
                n.meta.gid = g;
            }
            if let Some(t) = atime {
                n.meta.atime = time_of(t);
            }
            if let Some(t) = mtime {
                n.meta.mtime = time_of(t);
            }
            n.meta.ctime = ctime.unwrap_or(now);
            Ok(n.attr(ino.0))
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let s = self.lock();
        match s.node(ino.0).map(|n| &n.body) {
            Ok(Body::Link(t)) => reply.data(t.as_os_str().as_bytes()),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (kind, body) = match mode & libc::S_IFMT {
            libc::S_IFREG => (FileType::RegularFile, Body::File(Vec::new())),
            libc::S_IFIFO => (FileType::NamedPipe, Body::Other),
            libc::S_IFSOCK => (FileType::Socket, Body::Other),
            libc::S_IFCHR => (FileType::CharDevice, Body::Other),
            libc::S_IFBLK => (FileType::BlockDevice, Body::Other),
            _ => return reply.error(Errno::EINVAL),
        };
        let mut s = self.lock();
        let r = s.make(req, parent.0, name, kind, mode, body).and_then(|a| {
            let n = s.node_mut(a.ino.0)?;
            n.meta.rdev = rdev;
            Ok(n.attr(a.ino.0))
        });
        entry(reply, r);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let mut s = self.lock();
        let r = s.make(
            req,
            parent.0,
            name,
            FileType::Directory,
            mode,
            Body::Dir(BTreeMap::new()),
        );
        entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        done(reply, self.lock().unlink(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        done(reply, self.lock().unlink(parent.0, name, true));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let mut s = self.lock();
        let r = s.make(
            req,
            parent.0,
            link_name,
            FileType::Symlink,
            0o777,
            Body::Link(target.to_path_buf()),
        );
        entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        done(
            reply,
            self.lock().rename(parent.0, name, newparent.0, newname, flags),
        );
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let mut s = self.lock();
        let r = (|| {
            if s.is_dir(ino.0) {
                return Err(Errno::EPERM);
            }
            s.node(ino.0)?;
            if s.child(newparent.0, newname)?.is_some() {
                return Err(Errno::EEXIST);
            }
            s.entries_mut(newparent.0)?.insert(newname.to_os_string(), ino.0);
            let n = s.node_mut(ino.0)?;
            n.nlink += 1;
            n.meta.ctime = SystemTime::now();
            let a = n.attr(ino.0);
            s.dir_changed(newparent.0);
            Ok(a)
        })();
        entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.lock().node(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.lock();
        match s.node(ino.0).map(|n| &n.body) {
            Ok(Body::File(d)) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(d.len());
                let end = start.saturating_add(size as usize).min(d.len());
                reply.data(&d[start..end]);
            }
            Ok(_) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        let r = (|| {
            let n = s.node_mut(ino.0)?;
            let Body::File(d) = &mut n.body else {
                return Err(Errno::EISDIR);
            };
            // O_APPEND writes at the end as this file system has it, whatever the
            // kernel's idea of the size.
            let at = if flags.0 & libc::O_APPEND != 0 {
                d.len()
            } else {
                usize::try_from(offset).map_err(|_| Errno::EINVAL)?
            };
            let end = at.checked_add(data.len()).ok_or(Errno::EINVAL)?;
            if d.len() < end {
                d.resize(end, 0);
            }
            d[at..end].copy_from_slice(data);
            let now = SystemTime::now();
            n.meta.mtime = now;
            n.meta.ctime = now;
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let mut s = self.lock();
        if datasync {
            s.stats.fdatasyncs += 1;
        } else {
            s.stats.fsyncs += 1;
        }
        done(reply, s.persist_file(ino.0, !datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.lock();
        if let Err(e) = s.entries(ino.0) {
            return reply.error(e);
        }
        let fh = s.next_fh;
        s.next_fh += 1;
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut s = self.lock();
        if offset == 0 || !s.listings.contains_key(&fh.0) {
            // A listing taken once per pass, so that entries added or removed meanwhile
            // cannot make the others appear twice or not at all.
            let entries = match s.entries(ino.0) {
                Ok(e) => e.clone(),
                Err(e) => return reply.error(e),
            };
            let mut list = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (ROOT, FileType::Directory, OsString::from("..")),
            ];
            for (name, c) in entries {
                if let Some(n) = s.live.get(&c) {
                    list.push((c, n.meta.kind, name));
                }
            }
            s.listings.insert(fh.0, list);
        }
        let list = &s.listings[&fh.0];
        for (i, (c, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*c), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock().listings.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.lock();
        s.stats.dir_syncs += 1;
        if let Err(e) = s.entries(ino.0) {
            return reply.error(e);
        }
        s.persist_dir(ino.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.lock().live.len() as u64;
        reply.statfs(
            1 << 24,
            1 << 23,
            1 << 23,
            files + (1 << 20),
            1 << 20,
            4096,
            255,
            4096,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.lock();
        let r = match s.child(parent.0, name) {
            Ok(Some(_)) if flags & libc::O_EXCL != 0 => Err(Errno::EEXIST),
            Ok(Some(ino)) => s.node(ino).map(|n| n.attr(ino)),
            Ok(None) => s.make(
                req,
                parent.0,
                name,
                FileType::RegularFile,
                mode,
                Body::File(Vec::new()),
            ),
            Err(e) => Err(e),
        };
        match r {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted powerfs; unmounted when dropped.
pub struct PowerFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    /// Sessions of earlier mounts ([`PowerFs::power_cut_and_remount`]), dropped last: a
    /// session dropped while a mount of the same path is live could unmount that one.
    retired: Vec<fuser::BackgroundSession>,
}

/// Detaches whatever is mounted on `path` (processes still inside keep it, nobody else).
fn detach(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn serve(mountpoint: &Path, state: Arc<Mutex<State>>) -> io::Result<fuser::BackgroundSession> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("cyb-powerfs".into()),
        fuser::MountOption::Subtype("powerfs".into()),
        // The kernel checks permissions from the modes and owners we report, so jobs
        // of an unprivileged user meet the same rules as on a disk.
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Suid,
        fuser::MountOption::Exec,
    ];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(2);
    fuser::spawn_mount(Fs { state }, mountpoint, &cfg)
}

impl PowerFs {
    /// Mounts an empty powerfs on `mountpoint` (an existing directory). Needs root (or a
    /// FUSE that lets this user mount) and /dev/fuse.
    pub fn mount(mountpoint: &Path, opts: Options) -> io::Result<PowerFs> {
        let state = Arc::new(Mutex::new(State::new(opts)));
        let session = serve(mountpoint, state.clone())?;
        Ok(PowerFs {
            state,
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
            retired: Vec::new(),
        })
    }

    /// [`PowerFs::power_cut`], and the disk comes back as another device: the file system
    /// is mounted again on the same path with a new device number (`st_dev`), its inodes
    /// keeping their numbers. Device numbers are not stable across a reboot everywhere
    /// (btrfs subvolumes, device-mapper and NVMe numbering, overlayfs), so nothing may
    /// depend on them surviving one.
    pub fn power_cut_and_remount(&mut self) -> io::Result<()> {
        self.power_cut();
        // Held across the new mount, so the old one's device number is still taken.
        let hold = std::fs::File::open(&self.mountpoint)?;
        detach(&self.mountpoint);
        let new = serve(&self.mountpoint, self.state.clone())?;
        if let Some(old) = self.session.replace(new) {
            self.retired.push(old);
        }
        drop(hold);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The power goes: everything not made durable is gone, and the mount shows what the
    /// disk holds. Stop every process that writes here first (see the module's docs).
    pub fn power_cut(&self) {
        self.lock().power_cut();
    }

    /// Changes [`Options::writeback`] from now on.
    pub fn set_writeback(&self, p: f64) {
        self.lock().opts.writeback = p;
    }

    /// Changes [`Options::refuse_exchange`] from now on.
    pub fn set_refuse_exchange(&self, refuse: bool) {
        self.lock().opts.refuse_exchange = refuse;
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        // Detached, so a process still inside the mount cannot keep it (and this) alive.
        detach(&self.mountpoint);
        drop(self.session.take());
        self.retired.clear();
    }
}
