//! Confinement of worker processes: resource limits, a filtered environment, another user and
//! group, and `no_new_privs`. Everything is off by default.
//!
//! Owns the [`Confinement`] value (what to confine), its validation ([`ConfineError`]), and the
//! two steps that apply it when a worker is spawned: [`filter_env`] on the `Command` before
//! the fork, and [`PreExec::apply`] in the child between fork and exec, which makes only
//! async-signal-safe calls (`setrlimit`, `setgroups`, `setgid`, `setuid`, `prctl`) on values
//! computed before the fork ([`Confinement::prepare`]: names are resolved to ids there, with
//! `getpwnam_r` / `getgrnam_r`, never in the child).
//!
//! It does not own the rest of the spawn (process group, parent-death signal, the socket: see
//! `process`), the working directory (`PoolSpec::cwd`, checked in `spec`), nor any sandboxing
//! beyond these knobs (namespaces, seccomp, cgroups). No shell is involved: the worker is
//! exec'd directly as `python -m pyvisor_worker …`.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A soft and a hard limit for one resource (`setrlimit(2)`). `u64::MAX` means unlimited
/// (`RLIM_INFINITY`).
///
/// ```
/// use pyvisor_core::Limit;
/// assert_eq!(Limit::fixed(64), Limit::new(64, 64));
/// assert_eq!(Limit::new(1, 2).soft, 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The limit the kernel enforces (a CPU soft limit sends SIGXCPU).
    pub soft: u64,
    /// The ceiling the worker may raise its soft limit to (a CPU hard limit sends SIGKILL).
    pub hard: u64,
}

impl Limit {
    /// Soft and hard limits.
    pub fn new(soft: u64, hard: u64) -> Self {
        Limit { soft, hard }
    }
    /// The same value for both: the worker cannot raise it.
    pub fn fixed(value: u64) -> Self {
        Limit { soft: value, hard: value }
    }
}

/// A resource a [`Confinement`] can limit.
///
/// ```
/// use pyvisor_core::Resource;
/// assert_eq!(Resource::CpuTime.field(), "cpu_time");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Resource {
    /// Virtual address space in bytes (`RLIMIT_AS`).
    AddressSpace,
    /// Open file descriptors (`RLIMIT_NOFILE`): one more than the highest fd that can be opened.
    OpenFiles,
    /// CPU time in seconds (`RLIMIT_CPU`).
    CpuTime,
    /// Core dump size in bytes (`RLIMIT_CORE`).
    CoreSize,
}

impl Resource {
    const ALL: [Resource; 4] = [Resource::AddressSpace, Resource::OpenFiles, Resource::CpuTime, Resource::CoreSize];

    /// The configuration field naming this resource (`address_space`, `open_files`,
    /// `cpu_time`, `core_size`), as used in errors and tree files.
    pub fn field(self) -> &'static str {
        match self {
            Resource::AddressSpace => "address_space",
            Resource::OpenFiles => "open_files",
            Resource::CpuTime => "cpu_time",
            Resource::CoreSize => "core_size",
        }
    }

    fn index(self) -> usize {
        match self {
            Resource::AddressSpace => 0,
            Resource::OpenFiles => 1,
            Resource::CpuTime => 2,
            Resource::CoreSize => 3,
        }
    }

    /// `getrlimit` of this process, or `None` if the call fails.
    fn current(self) -> Option<Limit> {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `l` is a valid out-pointer for the duration of the call.
        let rc = unsafe {
            match self {
                Resource::AddressSpace => libc::getrlimit(libc::RLIMIT_AS, &mut l),
                Resource::OpenFiles => libc::getrlimit(libc::RLIMIT_NOFILE, &mut l),
                Resource::CpuTime => libc::getrlimit(libc::RLIMIT_CPU, &mut l),
                Resource::CoreSize => libc::getrlimit(libc::RLIMIT_CORE, &mut l),
            }
        };
        (rc == 0).then(|| Limit::new(rlim_to_u64(l.rlim_cur), rlim_to_u64(l.rlim_max)))
    }
}

fn rlim_to_u64(v: libc::rlim_t) -> u64 {
    if v == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        v
    }
}

fn u64_to_rlim(v: u64) -> libc::rlim_t {
    if v == u64::MAX {
        libc::RLIM_INFINITY
    } else {
        v
    }
}

/// A user or a group: a name (looked up in the system's databases before the worker is
/// forked) or a numeric id (used as is).
///
/// ```
/// use pyvisor_core::Principal;
/// assert_eq!(Principal::from("nobody"), Principal::Name("nobody".into()));
/// assert_eq!(Principal::from(65534u32), Principal::Id(65534));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user or group name (`getpwnam_r` / `getgrnam_r`).
    Name(String),
    /// A numeric uid or gid.
    Id(u32),
}

impl From<&str> for Principal {
    fn from(s: &str) -> Self {
        Principal::Name(s.to_string())
    }
}
impl From<String> for Principal {
    fn from(s: String) -> Self {
        Principal::Name(s)
    }
}
impl From<u32> for Principal {
    fn from(id: u32) -> Self {
        Principal::Id(id)
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Name(n) => write!(f, "{n:?}"),
            Principal::Id(id) => write!(f, "{id}"),
        }
    }
}

/// How a worker is confined. The default confines nothing: the worker runs as the parent's
/// user, with the parent's limits and environment (plus pyvisor's own variables).
///
/// Resource limits are set in the child before exec, so they hold from the interpreter's first
/// instruction (imports included) and are inherited by every process the worker starts.
/// [`Confinement::address_space`], [`open_files`](Confinement::open_files) and
/// [`core_size`](Confinement::core_size) set soft = hard (the worker cannot raise them);
/// [`cpu_time`](Confinement::cpu_time) sets the hard limit one second above the soft one, so
/// the worker dies of SIGXCPU (its own doing, which implicates its calls) rather than of a
/// SIGKILL that would look like an external kill. [`Confinement::limit`] takes any pair.
///
/// The environment can be an allow-list or a deny-list of names (a trailing `*` matches a
/// prefix: `LC_*`). Whatever pyvisor sets for the worker always reaches it, or the worker
/// could not work: its `PYVISOR_*` variables, `PYTHONUNBUFFERED`, the OpenTelemetry variables
/// (`OTEL_*`), the allocator settings it adds, and every [`crate::PoolSpec::env`] entry. The
/// lists filter only what the worker would inherit from the parent.
///
/// Another user and group need a parent running as root; names are resolved before the fork.
/// The worker gets exactly one group: `group`, else the user's primary group (supplementary
/// groups are dropped).
///
/// ```
/// use pyvisor_core::{Confinement, PoolSpec};
/// let c = Confinement::default()
///     .address_space(2 << 30)
///     .open_files(256)
///     .cpu_time(60)
///     .core_size(0)
///     .allow_env(["PATH", "HOME", "LANG", "LC_*"])
///     .no_new_privs(true);
/// assert!(!c.is_empty());
/// assert!(Confinement::default().is_empty());
/// let spec = PoolSpec::script("examples/workers/quickstart.py").confine(c);
/// # let _ = spec;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    limits: [Option<Limit>; 4],
    allow_env: Option<Vec<String>>,
    deny_env: Option<Vec<String>>,
    user: Option<Principal>,
    group: Option<Principal>,
    no_new_privs: bool,
}

/// What is wrong with a [`Confinement`], named by its field, with what to do about it.
///
/// ```
/// use pyvisor_core::{Confinement, Limit, Resource};
/// let e = Confinement::default().limit(Resource::OpenFiles, Limit::new(10, 5)).check().unwrap_err();
/// assert!(e.to_string().contains("confine.open_files"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfineError {
    /// The soft limit is above the hard one.
    #[error("confine.{field}: the soft limit {soft} is above the hard limit {hard}; give a soft limit at most the hard one")]
    SoftAboveHard {
        /// The field.
        field: &'static str,
        /// The soft limit given.
        soft: u64,
        /// The hard limit given.
        hard: u64,
    },
    /// A limit of zero where zero cannot work.
    #[error("confine.{field} must be at least 1 ({why})")]
    Zero {
        /// The field.
        field: &'static str,
        /// Why zero does not work.
        why: &'static str,
    },
    /// A hard limit above what this process may grant.
    #[error("confine.{field}: the hard limit {hard} is above {ceiling} ({why}); lower it")]
    AboveCeiling {
        /// The field.
        field: &'static str,
        /// The hard limit given.
        hard: u64,
        /// The highest allowed.
        ceiling: u64,
        /// Where the ceiling comes from.
        why: &'static str,
    },
    /// Both an allow-list and a deny-list.
    #[error("confine: allow_env and deny_env exclude each other; keep one of them")]
    BothEnvLists,
    /// An environment variable name or pattern that cannot match anything.
    #[error("confine.{field}: {name:?} is not a variable name (non-empty, no `=` or NUL; `*` only at the end, as a prefix pattern)")]
    BadEnvName {
        /// `allow_env` or `deny_env`.
        field: &'static str,
        /// The entry.
        name: String,
    },
    /// Another user or group was asked for, but this process is not root.
    #[error("confine.{field}: running workers as another user or group needs a parent running as root (this one runs as uid {euid}); remove confine.{field} or start the program as root")]
    NeedsRoot {
        /// `user` or `group`.
        field: &'static str,
        /// This process's effective uid.
        euid: u32,
    },
    /// A user or group name that the system does not know.
    #[error("confine.{field}: no {field} named {name:?} on this system; give an existing name or a numeric id")]
    Unknown {
        /// `user` or `group`.
        field: &'static str,
        /// The name.
        name: String,
    },
    /// A user or group lookup failed (not: the name does not exist).
    #[error("confine.{field}: looking up {name} failed: {detail}")]
    Lookup {
        /// `user` or `group`.
        field: &'static str,
        /// The name or id.
        name: String,
        /// The error.
        detail: String,
    },
    /// A numeric user id without a passwd entry and no group: the group is unknown.
    #[error("confine.user: uid {uid} has no passwd entry, so its primary group is unknown; set confine.group too")]
    NoPrimaryGroup {
        /// The uid.
        uid: u32,
    },
    /// The worker's user could not reach a file it needs.
    #[error("confine.user: {who} cannot {what} {}: {} is not {perm} for it; fix the permissions, move the file, or run as another user", path.display(), blocker.display())]
    NotAccessible {
        /// The uid and gid the worker would run as.
        who: String,
        /// `run the interpreter`, `read the script`, `enter the working directory`.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The path component that blocks it.
        blocker: PathBuf,
        /// `searchable`, `readable` or `executable`.
        perm: &'static str,
    },
}

impl Confinement {
    /// Limit the worker's virtual address space to `bytes` (soft = hard, `RLIMIT_AS`). Beyond
    /// it allocations fail: Python raises `MemoryError` in the call that allocates (the worker
    /// lives on), and C code that does not check may abort (a crash implicating its calls).
    /// Counts reserved address space, not memory in use: leave room for thread stacks and
    /// allocator arenas (a Python worker reserves a few hundred MiB at start).
    #[must_use]
    pub fn address_space(self, bytes: u64) -> Self {
        self.limit(Resource::AddressSpace, Limit::fixed(bytes))
    }
    /// Limit the worker's open file descriptors to `n` (soft = hard, `RLIMIT_NOFILE`): opening
    /// more fails with `OSError: [Errno 24] Too many open files`.
    #[must_use]
    pub fn open_files(self, n: u64) -> Self {
        self.limit(Resource::OpenFiles, Limit::fixed(n))
    }
    /// Limit the worker's CPU time to `seconds` (`RLIMIT_CPU`; soft `seconds`, hard one more).
    /// At the soft limit the kernel sends SIGXCPU, which kills a Python worker: a crash
    /// implicating the calls in flight, or a start failure before `hello`. The time is the
    /// process's total since it started (imports and every call), not per call.
    #[must_use]
    pub fn cpu_time(self, seconds: u64) -> Self {
        self.limit(Resource::CpuTime, Limit::new(seconds, seconds.saturating_add(1)))
    }
    /// Limit core dumps to `bytes` (soft = hard, `RLIMIT_CORE`); 0 writes none.
    #[must_use]
    pub fn core_size(self, bytes: u64) -> Self {
        self.limit(Resource::CoreSize, Limit::fixed(bytes))
    }
    /// Set any resource's soft and hard limits.
    ///
    /// ```
    /// use pyvisor_core::{Confinement, Limit, Resource};
    /// let c = Confinement::default().limit(Resource::OpenFiles, Limit::new(256, 1024));
    /// assert_eq!(c.get_limit(Resource::OpenFiles), Some(Limit::new(256, 1024)));
    /// assert_eq!(c.get_limit(Resource::CpuTime), None);
    /// ```
    #[must_use]
    pub fn limit(mut self, resource: Resource, limit: Limit) -> Self {
        self.limits[resource.index()] = Some(limit);
        self
    }
    /// The limit set for `resource`, if any.
    pub fn get_limit(&self, resource: Resource) -> Option<Limit> {
        self.limits[resource.index()]
    }
    /// Pass only these inherited variables (exact names, or prefixes ending in `*`), plus
    /// pyvisor's own (see the type's documentation). Calls add up.
    #[must_use]
    pub fn allow_env<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allow_env.get_or_insert_with(Vec::new).extend(names.into_iter().map(Into::into));
        self
    }
    /// Pass every inherited variable except these (exact names, or prefixes ending in `*`);
    /// pyvisor's own are never removed. Calls add up.
    #[must_use]
    pub fn deny_env<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.deny_env.get_or_insert_with(Vec::new).extend(names.into_iter().map(Into::into));
        self
    }
    /// Run the worker as this user (a name or a uid); its group is [`Confinement::group`],
    /// else the user's primary group. Needs a parent running as root.
    #[must_use]
    pub fn user(mut self, user: impl Into<Principal>) -> Self {
        self.user = Some(user.into());
        self
    }
    /// Run the worker with this group (a name or a gid) as its only group. Needs a parent
    /// running as root.
    #[must_use]
    pub fn group(mut self, group: impl Into<Principal>) -> Self {
        self.group = Some(group.into());
        self
    }
    /// Set `PR_SET_NO_NEW_PRIVS`: neither the worker nor anything it runs can gain privileges
    /// through exec (set-user-id binaries, file capabilities). Default off.
    #[must_use]
    pub fn no_new_privs(mut self, on: bool) -> Self {
        self.no_new_privs = on;
        self
    }
    /// Whether this confines nothing (the default).
    pub fn is_empty(&self) -> bool {
        *self == Confinement::default()
    }

    /// Check the confinement without spawning anything: limits, lists, and — when another
    /// user or group is asked for — that this process is root and the names exist.
    /// `Pool::start` does this first.
    ///
    /// ```
    /// use pyvisor_core::{ConfineError, Confinement};
    /// assert!(Confinement::default().open_files(64).deny_env(["AWS_*"]).check().is_ok());
    /// let e = Confinement::default().allow_env(["PATH"]).deny_env(["HOME"]).check();
    /// assert_eq!(e, Err(ConfineError::BothEnvLists));
    /// ```
    pub fn check(&self) -> Result<(), ConfineError> {
        let root = is_root();
        for r in Resource::ALL {
            let Some(l) = self.get_limit(r) else { continue };
            let field = r.field();
            if l.soft > l.hard {
                return Err(ConfineError::SoftAboveHard { field, soft: l.soft, hard: l.hard });
            }
            if r == Resource::CpuTime && l.soft == 0 {
                return Err(ConfineError::Zero { field, why: "the kernel treats a CPU limit of 0 as 1 second" });
            }
            if r == Resource::OpenFiles && l.soft == 0 {
                return Err(ConfineError::Zero { field, why: "the interpreter cannot open its own files with none" });
            }
            if !root {
                if let Some(parent) = r.current().filter(|p| l.hard > p.hard) {
                    return Err(ConfineError::AboveCeiling {
                        field,
                        hard: l.hard,
                        ceiling: parent.hard,
                        why: "this process's own hard limit; only root may raise it",
                    });
                }
            }
            if r == Resource::OpenFiles {
                if let Some(nr_open) = nr_open().filter(|n| l.hard > *n) {
                    return Err(ConfineError::AboveCeiling { field, hard: l.hard, ceiling: nr_open, why: "the kernel's fs.nr_open" });
                }
            }
        }
        if self.allow_env.is_some() && self.deny_env.is_some() {
            return Err(ConfineError::BothEnvLists);
        }
        for (field, list) in [("allow_env", &self.allow_env), ("deny_env", &self.deny_env)] {
            for name in list.iter().flatten() {
                let stem = name.strip_suffix('*').unwrap_or(name);
                if stem.is_empty() && !name.ends_with('*') || stem.contains(['=', '\0', '*']) {
                    return Err(ConfineError::BadEnvName { field, name: name.clone() });
                }
            }
        }
        self.identity().map(|_| ())
    }

    /// The uid (if changed) and gid the worker runs as, resolved now; `None` when neither is
    /// asked for.
    pub(crate) fn identity(&self) -> Result<Option<Identity>, ConfineError> {
        if self.user.is_none() && self.group.is_none() {
            return Ok(None);
        }
        if !is_root() {
            let field = if self.user.is_some() { "user" } else { "group" };
            // SAFETY: geteuid has no preconditions.
            return Err(ConfineError::NeedsRoot { field, euid: unsafe { libc::geteuid() } });
        }
        let user = match &self.user {
            None => None,
            Some(Principal::Name(n)) => match lookup_user(n)? {
                Some(ids) => Some(ids),
                None => return Err(ConfineError::Unknown { field: "user", name: n.clone() }),
            },
            Some(Principal::Id(uid)) => Some((*uid, lookup_uid(*uid)?)),
        };
        let gid = match &self.group {
            Some(Principal::Id(gid)) => *gid,
            Some(Principal::Name(n)) => {
                lookup_group(n)?.ok_or_else(|| ConfineError::Unknown { field: "group", name: n.clone() })?
            }
            None => match user {
                Some((_, Some(gid))) => gid,
                Some((uid, None)) => return Err(ConfineError::NoPrimaryGroup { uid }),
                None => return Ok(None),
            },
        };
        Ok(Some(Identity { uid: user.map(|(uid, _)| uid), gid }))
    }

    /// Compute everything the child applies between fork and exec (names resolved to ids,
    /// limits converted), so that [`PreExec::apply`] allocates nothing and looks nothing up.
    pub(crate) fn prepare(&self) -> Result<PreExec, ConfineError> {
        let mut limits = [None; 4];
        for r in Resource::ALL {
            limits[r.index()] = self.get_limit(r).map(|l| {
                (r, libc::rlimit { rlim_cur: u64_to_rlim(l.soft), rlim_max: u64_to_rlim(l.hard) })
            });
        }
        Ok(PreExec { limits, identity: self.identity()?, no_new_privs: self.no_new_privs })
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open").ok()?.trim().parse().ok()
}

/// The ids a worker runs as: `uid` when a user was asked for (else it keeps the parent's), and
/// its only group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub uid: Option<u32>,
    pub gid: u32,
}

impl Identity {
    /// Whether this identity may use `path` for `what` according to the mode bits of the path
    /// and its parent directories (ACLs are not consulted). Root passes everything but a file
    /// without any execute bit.
    pub(crate) fn check_access(&self, path: &Path, access: Access) -> Result<(), ConfineError> {
        let Some(uid) = self.uid.filter(|u| *u != 0) else { return Ok(()) };
        let (what, need, perm) = match access {
            Access::Run => ("run the interpreter", 0o1, "executable"),
            Access::Read => ("read the script", 0o4, "readable"),
            Access::Enter => ("enter the working directory", 0o1, "searchable"),
        };
        let deny = |blocker: &Path, perm: &'static str| ConfineError::NotAccessible {
            who: format!("uid {uid} (gid {})", self.gid),
            what,
            path: path.to_path_buf(),
            blocker: blocker.to_path_buf(),
            perm,
        };
        let allows = |p: &Path, bits: u32| -> Option<bool> {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(p).ok()?;
            let shift = if m.uid() == uid {
                6
            } else if m.gid() == self.gid {
                3
            } else {
                0
            };
            Some((m.mode() >> shift) & bits == bits)
        };
        // Both the path as given and where its symlinks lead must be reachable.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mut paths = vec![absolute.clone()];
        if let Ok(real) = absolute.canonicalize() {
            paths.push(real);
        }
        for p in &paths {
            for dir in p.ancestors().skip(1) {
                if allows(dir, 0o1) == Some(false) {
                    return Err(deny(dir, "searchable"));
                }
            }
        }
        let target = paths.last().unwrap_or(&absolute);
        if allows(target, need) == Some(false) {
            return Err(deny(target, perm));
        }
        Ok(())
    }
}

/// What a worker's user must be able to do with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Execute it (the interpreter).
    Run,
    /// Read it (the script).
    Read,
    /// Enter it (the working directory).
    Enter,
}

/// Look up a user: `Some((uid, Some(primary gid)))`, or `None` when no such user exists.
fn lookup_user(name: &str) -> Result<Option<(u32, Option<u32>)>, ConfineError> {
    let cname = c_name("user", name)?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: an all-zero passwd is a valid value for getpwnam_r to fill.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf.len()` is its size.
        let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some((pwd.pw_uid, Some(pwd.pw_gid)))),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            e => return Err(lookup_error("user", name, e)),
        }
    }
}

/// The primary gid of `uid`, if it has a passwd entry.
fn lookup_uid(uid: u32) -> Result<Option<u32>, ConfineError> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: as in `lookup_user`.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf.len()` is its size.
        let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(pwd.pw_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            e => return Err(lookup_error("user", &uid.to_string(), e)),
        }
    }
}

/// Look up a group's gid, or `None` when no such group exists.
fn lookup_group(name: &str) -> Result<Option<u32>, ConfineError> {
    let cname = c_name("group", name)?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: an all-zero group is a valid value for getgrnam_r to fill.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf.len()` is its size.
        let rc = unsafe { libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(grp.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            e => return Err(lookup_error("group", name, e)),
        }
    }
}

fn c_name(field: &'static str, name: &str) -> Result<CString, ConfineError> {
    CString::new(name).map_err(|_| ConfineError::Unknown { field, name: name.to_string() })
}

fn lookup_error(field: &'static str, name: &str, errno: i32) -> ConfineError {
    // glibc reports "not found" as 0 with a null result, but some NSS modules use these.
    if matches!(errno, libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM) {
        return ConfineError::Unknown { field, name: name.to_string() };
    }
    ConfineError::Lookup { field, name: name.to_string(), detail: std::io::Error::from_raw_os_error(errno).to_string() }
}

/// Variables that always reach the worker, whatever the lists say: pyvisor's own and the
/// OpenTelemetry set-up (explicitly set variables are kept as well, see [`filter_env`]).
fn always_kept(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b"PYVISOR_") || b.starts_with(b"OTEL_") || b == b"PYTHONUNBUFFERED"
}

fn matches(patterns: &[String], name: &OsStr) -> bool {
    let b = name.as_bytes();
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => b.starts_with(prefix.as_bytes()),
        None => b == p.as_bytes(),
    })
}

/// Apply the environment lists of `c` to `cmd`, before the fork. Variables set on `cmd`
/// explicitly (pyvisor's own, the OpenTelemetry set-up, the allocator defaults, the spec's
/// `env` entries) are kept as set; only what the worker would inherit from this process is
/// filtered, except `PYVISOR_*`, `OTEL_*` and `PYTHONUNBUFFERED`, which always pass. Call it
/// after every `env` call on `cmd`.
pub(crate) fn filter_env(c: &Confinement, cmd: &mut std::process::Command) {
    let explicit: Vec<(OsString, Option<OsString>)> =
        cmd.get_envs().map(|(k, v)| (k.to_os_string(), v.map(OsStr::to_os_string))).collect();
    let is_explicit = |k: &OsStr| explicit.iter().any(|(e, _)| e == k);
    if let Some(allow) = &c.allow_env {
        cmd.env_clear();
        for (k, v) in std::env::vars_os() {
            if always_kept(&k) || matches(allow, &k) {
                cmd.env(k, v);
            }
        }
        for (k, v) in &explicit {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
    } else if let Some(deny) = &c.deny_env {
        for (k, _) in std::env::vars_os() {
            if matches(deny, &k) && !always_kept(&k) && !is_explicit(&k) {
                cmd.env_remove(k);
            }
        }
    }
}

/// What the child applies between fork and exec, computed before the fork by
/// [`Confinement::prepare`].
#[derive(Debug, Clone)]
pub(crate) struct PreExec {
    limits: [Option<(Resource, libc::rlimit)>; 4],
    identity: Option<Identity>,
    no_new_privs: bool,
}

impl PreExec {
    /// Apply the confinement in the forked child: `setrlimit` for each limit, then
    /// `setgroups`, `setgid`, `setuid` (in that order: after `setuid` the others are no longer
    /// permitted), then `prctl(PR_SET_NO_NEW_PRIVS)`. Only async-signal-safe calls on
    /// precomputed values; nothing is allocated.
    ///
    /// A change of user clears the parent-death signal (the kernel resets it when credentials
    /// change), so call this before `PR_SET_PDEATHSIG` is set.
    pub(crate) fn apply(&self) -> std::io::Result<()> {
        for (r, l) in self.limits.iter().flatten() {
            // SAFETY: setrlimit is async-signal-safe; `l` is valid for the call.
            let rc = unsafe {
                match r {
                    Resource::AddressSpace => libc::setrlimit(libc::RLIMIT_AS, l),
                    Resource::OpenFiles => libc::setrlimit(libc::RLIMIT_NOFILE, l),
                    Resource::CpuTime => libc::setrlimit(libc::RLIMIT_CPU, l),
                    Resource::CoreSize => libc::setrlimit(libc::RLIMIT_CORE, l),
                }
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(id) = &self.identity {
            let gid: libc::gid_t = id.gid;
            // SAFETY: setgroups, setgid, setuid are plain syscalls; the group list is one
            // gid on the stack.
            unsafe {
                if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(uid) = id.uid {
                    if libc::setuid(uid) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
        }
        if self.no_new_privs {
            // SAFETY: plain syscall.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envs(cmd: &std::process::Command) -> Vec<(String, Option<String>)> {
        cmd.get_envs()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.map(|v| v.to_string_lossy().into_owned())))
            .collect()
    }

    #[test]
    fn the_default_confines_nothing_and_prepares_nothing() {
        let c = Confinement::default();
        assert!(c.is_empty());
        assert_eq!(c.check(), Ok(()));
        let p = c.prepare().expect("prepare");
        assert!(p.limits.iter().all(Option::is_none) && p.identity.is_none() && !p.no_new_privs);
        let mut cmd = std::process::Command::new("true");
        cmd.env("PYVISOR_FD", "3");
        filter_env(&c, &mut cmd);
        assert_eq!(envs(&cmd), vec![("PYVISOR_FD".to_string(), Some("3".to_string()))]);
    }

    #[test]
    fn builders_set_documented_soft_and_hard_limits() {
        let c = Confinement::default().address_space(1 << 30).open_files(64).cpu_time(5).core_size(0);
        assert_eq!(c.get_limit(Resource::AddressSpace), Some(Limit::fixed(1 << 30)));
        assert_eq!(c.get_limit(Resource::OpenFiles), Some(Limit::fixed(64)));
        assert_eq!(c.get_limit(Resource::CpuTime), Some(Limit::new(5, 6)), "CPU hard limit is one second above");
        assert_eq!(c.get_limit(Resource::CoreSize), Some(Limit::fixed(0)));
        assert_eq!(Confinement::default().cpu_time(u64::MAX).get_limit(Resource::CpuTime), Some(Limit::fixed(u64::MAX)));
        let p = c.prepare().expect("prepare");
        let as_limit = p.limits[Resource::AddressSpace.index()].expect("set").1;
        assert_eq!((as_limit.rlim_cur, as_limit.rlim_max), (1 << 30, 1 << 30));
        let unlimited = Confinement::default().limit(Resource::CoreSize, Limit::new(0, u64::MAX)).prepare().expect("prepare");
        assert_eq!(unlimited.limits[Resource::CoreSize.index()].expect("set").1.rlim_max, libc::RLIM_INFINITY);
    }

    #[test]
    fn bad_values_are_errors_naming_the_field() {
        let cases = [
            (Confinement::default().limit(Resource::AddressSpace, Limit::new(2, 1)), "confine.address_space"),
            (Confinement::default().cpu_time(0), "confine.cpu_time"),
            (Confinement::default().open_files(0), "confine.open_files"),
            (Confinement::default().open_files(u64::MAX - 1), "confine.open_files"),
            (Confinement::default().allow_env(["A"]).deny_env(["B"]), "allow_env and deny_env"),
            (Confinement::default().allow_env(["A=B"]), "confine.allow_env"),
            (Confinement::default().deny_env(["*X"]), "confine.deny_env"),
            (Confinement::default().deny_env([""]), "confine.deny_env"),
        ];
        for (c, field) in cases {
            let e = c.check().expect_err(field).to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        assert_eq!(Confinement::default().allow_env(["LC_*", "*"]).check(), Ok(()));
    }

    #[test]
    fn users_and_groups_resolve_or_fail_typed() {
        if !is_root() {
            let e = Confinement::default().user("nobody").check().expect_err("not root");
            assert!(matches!(e, ConfineError::NeedsRoot { field: "user", .. }), "{e}");
            let e = Confinement::default().group(0u32).check().expect_err("not root");
            assert!(matches!(e, ConfineError::NeedsRoot { field: "group", .. }), "{e}");
            return;
        }
        let root = Confinement::default().user("root").identity().expect("root resolves");
        assert_eq!(root, Some(Identity { uid: Some(0), gid: 0 }));
        let e = Confinement::default().user("no-such-user-pyvisor").check().expect_err("unknown");
        assert!(e.to_string().contains("confine.user") && e.to_string().contains("no-such-user-pyvisor"), "{e}");
        let e = Confinement::default().user(0u32).group("no-such-group-pyvisor").check().expect_err("unknown");
        assert!(e.to_string().contains("confine.group"), "{e}");
        let e = Confinement::default().user(4_000_000_000u32).check().expect_err("no passwd entry");
        assert_eq!(e, ConfineError::NoPrimaryGroup { uid: 4_000_000_000 });
        let ok = Confinement::default().user(4_000_000_000u32).group(4_000_000_001u32).identity().expect("ids");
        assert_eq!(ok, Some(Identity { uid: Some(4_000_000_000), gid: 4_000_000_001 }));
        assert_eq!(Confinement::default().group(0u32).identity(), Ok(Some(Identity { uid: None, gid: 0 })));
    }

    #[test]
    fn access_checks_follow_mode_bits_of_every_ancestor() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pyvisor-confine-unit-{}", std::process::id()));
        let inner = dir.join("inner");
        std::fs::create_dir_all(&inner).expect("mkdir");
        let file = inner.join("w.py");
        std::fs::write(&file, "x = 1\n").expect("write");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let nobody = Identity { uid: Some(4_000_000_000), gid: 4_000_000_000 };
        assert_eq!(nobody.check_access(&file, Access::Read), Ok(()));
        let e = nobody.check_access(&file, Access::Run).expect_err("no x bit");
        assert!(e.to_string().contains("executable"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let e = nobody.check_access(&file, Access::Read).expect_err("dir closed");
        assert!(matches!(&e, ConfineError::NotAccessible { blocker, .. } if *blocker == dir), "{e}");
        assert_eq!(Identity { uid: None, gid: 0 }.check_access(&file, Access::Read), Ok(()), "uid unchanged");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_allow_list_keeps_pyvisors_own_and_explicit_variables() {
        // The test process's environment is whatever cargo gave it; build the expectation from it.
        let c = Confinement::default().allow_env(["PATH", "CARGO_*"]);
        let mut cmd = std::process::Command::new("true");
        cmd.env("PYVISOR_WORKER_ID", "w1").env("USER_SET", "1").env("MALLOC_TOP_PAD_", "16");
        filter_env(&c, &mut cmd);
        let got = envs(&cmd);
        assert!(got.contains(&("PYVISOR_WORKER_ID".into(), Some("w1".into()))));
        assert!(got.contains(&("USER_SET".into(), Some("1".into()))));
        assert!(got.contains(&("MALLOC_TOP_PAD_".into(), Some("16".into()))));
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            let kept = got.iter().any(|(g, v)| *g == k && v.is_some());
            let expected = k == "PATH" || k == "PYTHONUNBUFFERED" || k.starts_with("CARGO_") || k.starts_with("PYVISOR_") || k.starts_with("OTEL_");
            assert_eq!(kept, expected, "{k}");
        }
    }

    #[test]
    fn a_deny_list_removes_only_inherited_matches() {
        let Some((name, _)) = std::env::vars_os().find(|(k, _)| k.to_string_lossy().starts_with("CARGO_")) else { return };
        let c = Confinement::default().deny_env(["CARGO_*", "PYVISOR_*", "EXPLICIT"]);
        let mut cmd = std::process::Command::new("true");
        cmd.env("EXPLICIT", "kept");
        filter_env(&c, &mut cmd);
        let got = envs(&cmd);
        assert!(got.contains(&(name.to_string_lossy().into_owned(), None)), "inherited CARGO_ var removed: {got:?}");
        assert!(got.contains(&("EXPLICIT".into(), Some("kept".into()))));
        assert!(!got.iter().any(|(k, v)| k.starts_with("PYVISOR_") && v.is_none()), "pyvisor's own never removed");
    }
}
