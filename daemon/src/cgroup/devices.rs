//! Device access control: which device nodes a job may open.
//!
//! A job gets a [`DeviceAllow`] list; everything else is denied, except the standard safe
//! set of [`DEFAULT_RULES`]. The same rules can be enforced two ways; a job gets the one
//! its [`super::Routing`] names (the BPF filter where it loads, so a hybrid host uses it
//! and not the v1 controller), and [`super::Cgroups::probe_devices`] tests each alone:
//!
//! - cgroup v1 `devices` controller: `a` written to `devices.deny`, then one
//!   `devices.allow` write per rule ([`DeviceRule`]'s `Display` is that syntax; the writes
//!   are in `v1/devices.rs`);
//! - cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program, hand-assembled here from the rules
//!   ([`device_program`]), loaded with the raw `bpf(2)` syscall and attached to the job's
//!   unified cgroup with `BPF_CGROUP_DEVICE` (per job by `v2/devices.rs`). The kernel runs
//!   it on every open and mknod of a device node by a process of the cgroup; it works even
//!   where the unified mount carries no controllers (hybrid hosts).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::str::FromStr;

/// Character or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Char,
    Block,
}

/// One device (or range of devices, with a wildcard major or minor) a job may use, and
/// how. Written and parsed in the v1 `devices.allow` syntax: `c 195:0 rw`, `c 136:* rwm`,
/// `b *:* m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceRule {
    pub kind: DeviceKind,
    /// `None` matches every major.
    pub major: Option<u32>,
    /// `None` matches every minor.
    pub minor: Option<u32>,
    pub read: bool,
    pub write: bool,
    /// Creating the node with mknod(2) (which also needs CAP_MKNOD).
    pub mknod: bool,
}

/// Largest major and minor numbers Linux has (12 and 20 bits).
const MAX_MAJOR: u32 = (1 << 12) - 1;
const MAX_MINOR: u32 = (1 << 20) - 1;

impl DeviceRule {
    /// A character device rule allowing read and/or write (not mknod).
    pub const fn char(major: u32, minor: Option<u32>, read: bool, write: bool) -> DeviceRule {
        DeviceRule {
            kind: DeviceKind::Char,
            major: Some(major),
            minor,
            read,
            write,
            mknod: false,
        }
    }

    const fn rwm(major: u32, minor: Option<u32>) -> DeviceRule {
        DeviceRule {
            kind: DeviceKind::Char,
            major: Some(major),
            minor,
            read: true,
            write: true,
            mknod: true,
        }
    }

    /// The access bits in the BPF encoding (`BPF_DEVCG_ACC_*`: mknod 1, read 2, write 4).
    fn bpf_access(&self) -> i32 {
        i32::from(self.mknod) | (i32::from(self.read) << 1) | (i32::from(self.write) << 2)
    }
}

impl fmt::Display for DeviceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            DeviceKind::Char => 'c',
            DeviceKind::Block => 'b',
        };
        let num = |n: Option<u32>| n.map_or_else(|| "*".to_string(), |n| n.to_string());
        let mut access = String::new();
        for (on, c) in [(self.read, 'r'), (self.write, 'w'), (self.mknod, 'm')] {
            if on {
                access.push(c);
            }
        }
        write!(f, "{kind} {}:{} {access}", num(self.major), num(self.minor))
    }
}

/// Why a device rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device rule {rule:?}: {why} (expected e.g. \"c 195:0 rw\" or \"c 136:* rwm\")")]
pub struct DeviceRuleError {
    pub rule: String,
    pub why: &'static str,
}

impl FromStr for DeviceRule {
    type Err = DeviceRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| DeviceRuleError {
            rule: s.to_string(),
            why,
        };
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [kind, nums, access] = parts[..] else {
            return Err(err("want three fields: type, major:minor, access"));
        };
        let kind = match kind {
            "c" => DeviceKind::Char,
            "b" => DeviceKind::Block,
            _ => return Err(err("the type must be c or b")),
        };
        let (major, minor) = nums.split_once(':').ok_or_else(|| err("want major:minor"))?;
        let num = |n: &str, max: u32| -> Result<Option<u32>, DeviceRuleError> {
            if n == "*" {
                return Ok(None);
            }
            match n.parse::<u32>() {
                Ok(v) if v <= max => Ok(Some(v)),
                _ => Err(err("major and minor must be numbers in range, or *")),
            }
        };
        let (major, minor) = (num(major, MAX_MAJOR)?, num(minor, MAX_MINOR)?);
        let (mut read, mut write, mut mknod) = (false, false, false);
        for c in access.chars() {
            match c {
                'r' => read = true,
                'w' => write = true,
                'm' => mknod = true,
                _ => return Err(err("the access must be letters of rwm")),
            }
        }
        Ok(DeviceRule {
            kind,
            major,
            minor,
            read,
            write,
            mknod,
        })
    }
}

/// What every confined job may use whatever its [`DeviceAllow`] says: runc's default set
/// (without its `c *:* m`/`b *:* m` mknod rules and tun/tap): `/dev/null` 1:3,
/// `/dev/zero` 1:5, `/dev/full` 1:7, `/dev/random` 1:8, `/dev/urandom` 1:9, `/dev/tty` 5:0,
/// `/dev/ptmx` 5:2 and the pseudo-terminals `/dev/pts/*` 136:*. Not `/dev/console` (5:1):
/// a job has no business on the system console.
pub const DEFAULT_RULES: [DeviceRule; 8] = [
    DeviceRule::rwm(1, Some(3)),
    DeviceRule::rwm(1, Some(5)),
    DeviceRule::rwm(1, Some(7)),
    DeviceRule::rwm(1, Some(8)),
    DeviceRule::rwm(1, Some(9)),
    DeviceRule::rwm(5, Some(0)),
    DeviceRule::rwm(5, Some(2)),
    DeviceRule::rwm(136, None),
];

/// The devices a job may use beyond [`DEFAULT_RULES`] (for example its GPUs: `c 195:0 rw`
/// for `/dev/nvidia0`, `c 195:255 rw` for `/dev/nvidiactl`). Every other device node is
/// denied: opening one fails with EPERM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceAllow {
    pub rules: Vec<DeviceRule>,
}

impl DeviceAllow {
    pub fn new(rules: Vec<DeviceRule>) -> DeviceAllow {
        DeviceAllow { rules }
    }

    /// The default set followed by this list: what the job may really use.
    pub fn effective(&self) -> Vec<DeviceRule> {
        DEFAULT_RULES.iter().chain(&self.rules).copied().collect()
    }
}

/// One eBPF instruction, laid out as the kernel's `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Insn {
    code: u8,
    /// dst_reg:4 and src_reg:4 bit-fields.
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
const ALU32_MOV_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X: dst = (u32)src
const ALU32_AND_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K: dst &= imm
const ALU32_RSH_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K: dst >>= imm
const ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K: dst = imm
const JMP_JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K: if dst != imm goto pc + 1 + off
const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT: return r0

// struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }, where access_type
// is (BPF_DEVCG_ACC_* << 16) | BPF_DEVCG_DEV_*.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    #[cfg(target_endian = "little")]
    let regs = (src << 4) | (dst & 0x0f);
    #[cfg(target_endian = "big")]
    let regs = (dst << 4) | (src & 0x0f);
    Insn { code, regs, off, imm }
}

/// The program that allows exactly `rules` (returns 1) and denies everything else (0).
///
/// ```text
///   r2 = ctx->access_type; r3 = r2 & 0xffff (type); r2 >>= 16 (access)
///   r4 = ctx->major; r5 = ctx->minor
///   per rule:  if r3 != type goto next
///              r6 = r2 & ~allowed; if r6 != 0 goto next     (some access not allowed)
///              if r4 != major goto next; if r5 != minor goto next   (unless wildcards)
///              r0 = 1; exit
///   next:      ...
///   r0 = 0; exit
/// ```
pub(crate) fn device_program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut prog = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU32_MOV_X, 3, 2, 0, 0),
        insn(ALU32_AND_K, 3, 0, 0, 0xffff),
        insn(ALU32_RSH_K, 2, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for rule in rules {
        let access = rule.bpf_access();
        if access == 0 {
            continue;
        }
        // Jumps hold their position in the block for now; `off` is set once the block's
        // length is known.
        let mut block = Vec::new();
        let kind = match rule.kind {
            DeviceKind::Char => DEV_CHAR,
            DeviceKind::Block => DEV_BLOCK,
        };
        block.push(insn(JMP_JNE_K, 3, 0, 0, kind));
        if access != 7 {
            block.push(insn(ALU32_MOV_X, 6, 2, 0, 0));
            block.push(insn(ALU32_AND_K, 6, 0, 0, !access & 7));
            block.push(insn(JMP_JNE_K, 6, 0, 0, 0));
        }
        if let Some(major) = rule.major {
            // Majors and minors fit in 12 and 20 bits, so in i32.
            block.push(insn(JMP_JNE_K, 4, 0, 0, major as i32));
        }
        if let Some(minor) = rule.minor {
            block.push(insn(JMP_JNE_K, 5, 0, 0, minor as i32));
        }
        block.push(insn(ALU64_MOV_K, 0, 0, 0, 1));
        block.push(insn(JMP_EXIT, 0, 0, 0, 0));
        let len = block.len();
        for (i, ins) in block.iter_mut().enumerate() {
            if ins.code == JMP_JNE_K {
                // To the first instruction after the block.
                ins.off = (len - i - 1) as i16;
            }
        }
        prog.extend(block);
    }
    prog.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    prog.push(insn(JMP_EXIT, 0, 0, 0, 0));
    prog
}

// bpf(2) commands, program and attach types, flags (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Programs of ancestors and descendants all run and all must allow: a job cannot attach
/// a laxer program below ours, and ours composes with systemd's `DevicePolicy=` program.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel takes a shorter
/// attr than its own and zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The leading fields of `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Why the device program could not be loaded: the error and, when the verifier said
/// something, the end of its log.
#[derive(Debug)]
pub(crate) struct LoadError {
    pub source: io::Error,
    pub log: String,
}

fn prog_load(prog: &[Insn], log: Option<&mut [u8]>) -> io::Result<OwnedFd> {
    const LICENSE: &[u8] = b"MIT\0";
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"cybd_devices");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    if let Some(buf) = log {
        attr.log_level = 1;
        attr.log_size = buf.len() as u32;
        attr.log_buf = buf.as_mut_ptr() as u64;
    }
    // SAFETY: attr is a live, fully initialised repr(C) prefix of union bpf_attr of the size
    // passed; the pointers in it (instructions, license, log buffer) stay valid for the
    // duration of the call and the log buffer's length is the one given. The kernel returns
    // a new descriptor (close-on-exec) or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut ProgLoadAttr,
            size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads the device program for `rules`. On a verifier rejection the program is loaded
/// once more with the verifier's log on, for the error.
pub(crate) fn load_device_program(rules: &[DeviceRule]) -> Result<OwnedFd, LoadError> {
    let prog = device_program(rules);
    match prog_load(&prog, None) {
        Ok(fd) => Ok(fd),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EACCES)) => {
            let mut buf = vec![0u8; 64 * 1024];
            let _ = prog_load(&prog, Some(&mut buf));
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            let text = String::from_utf8_lossy(&buf[..end]);
            let lines: Vec<&str> = text.lines().collect();
            let log = lines[lines.len().saturating_sub(8)..].join(" | ");
            Err(LoadError { source: e, log })
        }
        Err(e) => Err(LoadError {
            source: e,
            log: String::new(),
        }),
    }
}

/// Attaches a loaded device program to the unified cgroup directory `dir`.
pub(crate) fn attach_device_program(dir: &Path, prog: &OwnedFd) -> io::Result<()> {
    let cg = File::open(dir)?;
    let mut attr = ProgAttachAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: attr is a live, fully initialised repr(C) prefix of union bpf_attr of the size
    // passed, holding two descriptors that stay open for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &mut attr as *mut ProgAttachAttr,
            size_of::<ProgAttachAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_syntax_round_trips() {
        for s in ["c 195:0 rw", "c 136:* rwm", "b *:* m", "c 1:3 r", "b 8:0 w"] {
            let r: DeviceRule = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        let r: DeviceRule = "c 195:255 rw".parse().unwrap();
        assert_eq!(r, DeviceRule::char(195, Some(255), true, true));
        for bad in [
            "",
            "a",
            "a *:* rwm",
            "c 195 rw",
            "c 195:0 rx",
            "c 5000:0 r",
            "c 1:2000000 r",
            "c x:1 r",
        ] {
            assert!(bad.parse::<DeviceRule>().is_err(), "{bad:?} parsed");
        }
        let e = "c 1".parse::<DeviceRule>().unwrap_err().to_string();
        assert!(e.starts_with("invalid device rule \"c 1\""), "{e}");
    }

    /// Runs the program the way the kernel would, for the few opcodes it uses.
    fn run(prog: &[Insn], kind: i32, access: i32, major: u32, minor: u32) -> u64 {
        let ctx = [((access << 16) | kind) as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            #[cfg(target_endian = "little")]
            let (dst, src) = ((i.regs & 0x0f) as usize, (i.regs >> 4) as usize);
            #[cfg(target_endian = "big")]
            let (dst, src) = ((i.regs >> 4) as usize, (i.regs & 0x0f) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1);
                    r[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                ALU32_MOV_X => r[dst] = r[src] & 0xffff_ffff,
                ALU32_AND_K => r[dst] = (r[dst] as u32 & i.imm as u32) as u64,
                ALU32_RSH_K => r[dst] = (r[dst] as u32 >> i.imm) as u64,
                ALU64_MOV_K => r[dst] = i.imm as i64 as u64,
                JMP_JNE_K => {
                    if r[dst] != i.imm as i64 as u64 {
                        pc += i.off as usize;
                    }
                }
                JMP_EXIT => return r[0],
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn program_allows_exactly_the_rules() {
        let rules = [
            "c 195:0 rw".parse().unwrap(),
            "c 136:* rwm".parse().unwrap(),
            "b 8:* r".parse().unwrap(),
            "c *:* m".parse().unwrap(),
        ];
        let p = device_program(&rules);
        let (r, w, m) = (2, 4, 1);
        assert_eq!(run(&p, DEV_CHAR, r, 195, 0), 1);
        assert_eq!(run(&p, DEV_CHAR, r | w, 195, 0), 1);
        assert_eq!(run(&p, DEV_CHAR, r | w, 195, 1), 0, "other minor");
        assert_eq!(run(&p, DEV_BLOCK, r, 195, 0), 0, "block, not char");
        assert_eq!(run(&p, DEV_CHAR, r | w, 136, 7), 1);
        assert_eq!(run(&p, DEV_BLOCK, r, 8, 3), 1);
        assert_eq!(run(&p, DEV_BLOCK, w, 8, 3), 0, "write not allowed");
        assert_eq!(run(&p, DEV_CHAR, m, 10, 200), 1, "mknod anywhere");
        assert_eq!(run(&p, DEV_CHAR, r, 10, 200), 0);
        // Empty list: everything denied.
        let p = device_program(&[]);
        assert_eq!(p.len(), 8);
        assert_eq!(run(&p, DEV_CHAR, r, 1, 3), 0);
    }

    #[test]
    fn instruction_encoding() {
        assert_eq!(size_of::<Insn>(), 8);
        assert_eq!(size_of::<ProgLoadAttr>(), 72);
        assert_eq!(size_of::<ProgAttachAttr>(), 20);
        let p = device_program(&[DeviceRule::char(195, Some(0), true, false)]);
        // r2 = *(u32 *)(r1 + 0): dst 2 in the low nibble, src 1 in the high one.
        #[cfg(target_endian = "little")]
        assert_eq!(
            p[0],
            Insn {
                code: 0x61,
                regs: 0x12,
                off: 0,
                imm: 0
            }
        );
        // First check of the rule: if r3 != CHAR skip the other 7 instructions of the block.
        assert_eq!(p[6].code, JMP_JNE_K);
        assert_eq!((p[6].off, p[6].imm), (7, DEV_CHAR));
        // Only read allowed: r6 = access & (write | mknod).
        assert_eq!(p[8].imm, 5);
    }
}
