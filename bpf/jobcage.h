/* jobcage.h - the one header shared by the BPF programs and (by name) agent/tracer/ (abi.py reads
 * its #defines and enums from this text).
 *
 * Fixed-width bcc types only (u32/u64/s32/char): bcc's Python side derives the ctypes
 * layout of `struct jc_event` from this definition (b["events"].event(data)), and only
 * knows these spellings.  Every field is naturally aligned, so the layout is the same
 * for any compiler.  Bump JC_ABI when a struct changes.
 */
#ifndef JOBCAGE_H
#define JOBCAGE_H

#define JC_ABI 4   /* 2: every event carries the process's mark bits; JC_MARK_USERNS; struct jc_filter;
                      3: struct jc_exited carries the task's CPU time; exec events the euid and the
                         exec'd file's mode and owner (pad became euid);
                      4: struct jc_cpu_key / the cpu_sums map (exits of tasks born in the job), jc_filter.cpu_sums */

#define JC_MAX_JOBS 1024          /* counter slots; a node runs far fewer jobs */
#define JC_COMM_LEN 16
#define JC_FILENAME_LEN 256
#define JC_LINEAGE_ENTRIES 65536  /* live tasks of all jobs; LRU so a full map never fails */
#define JC_PENDING_ENTRIES 16384  /* tasks inside a set*id syscall right now */
#define JC_CPU_SUM_ENTRIES 16384  /* (job, uid) pairs with summed exit CPU; a full map sends exits the per-task way */
#define JC_NS_PER_SEC 1000000000ULL

/* Event kinds (struct jc_event.kind).  Names match agent/events.py KINDS. */
enum jc_kind {
	JC_EV_EXEC = 1,
	JC_EV_EXIT = 2,
	JC_EV_SETUID = 3,       /* setuid, setreuid, setresuid */
	JC_EV_SETGID = 4,       /* setgid, setregid, setresgid, setgroups */
	JC_EV_SETSID = 5,
	JC_EV_FORK_FAILED = 6,  /* rate limited: at most one per job per CPU per second */
	JC_EV_USERNS = 7,       /* user namespace: created, joined, or its uid/gid map opened for writing */
};

/* Which syscall an identity event came from (struct jc_event.sys). */
enum jc_sys {
	JC_SYS_NONE = 0,
	JC_SYS_SETUID = 1,
	JC_SYS_SETREUID = 2,
	JC_SYS_SETRESUID = 3,
	JC_SYS_SETGID = 4,
	JC_SYS_SETREGID = 5,
	JC_SYS_SETRESGID = 6,
	JC_SYS_SETGROUPS = 7,
	JC_SYS_SETSID = 8,
	JC_SYS_UNSHARE = 9,     /* userns events: arg0 = flags (low 32 bits), ret = 0 or -errno */
	JC_SYS_CLONE = 10,      /* arg0 = flags, ret = child pid (in the parent) or -errno */
	JC_SYS_CLONE3 = 11,
	JC_SYS_SETNS = 12,      /* arg0 = fd, arg1 = nstype (0 = any: user space checks what changed) */
	JC_SYS_MAP = 13,        /* open for writing of a .../uid_map or gid_map: arg0 = dirfd, arg1 = open
	                         * flags, filename = the path as passed (maybe relative to dirfd) */
};

#define JC_CLONE_NEWUSER 0x10000000   /* linux/sched.h */
#define JC_NSPATH_LEN 64              /* longest uid_map path looked at ("/proc/4194304/uid_map" is 21) */

/* Bits of the `marked` map (tgid -> bits).  An exit is reported when the process was SEEN (user
 * space got an event about it, so its end completes the story) and its real uid differs from the
 * owner's or it CHANGED identity.  Without SEEN, a fork bomb under a pool uid would send one exit
 * per child; with it, quiet children stay counts. */
#define JC_MARK_CHANGED 1   /* identity changed in the job; inherited by children */
#define JC_MARK_SEEN 2      /* an exec / identity / setsid event was sent; not inherited */
#define JC_MARK_USERNS 4    /* entered a user namespace (or was in one when user space seeded it); inherited.
                             * Without it, user space knows without reading /proc that the process runs
                             * in the namespace its job's processes were seeded in (the initial one). */
#define JC_MARK_INHERITED (JC_MARK_CHANGED | JC_MARK_USERNS)

#define JC_MAX_LEVEL 16       /* cgroup2 depths searched for a job that holds a whole subtree */
#define JC_JOB_SUBTREE 1      /* jc_job.flags: the job is this cgroup and every cgroup below it */

/* Value of the job maps (cgroup2 id -> job, and tgid -> job in pid-filter mode). */
struct jc_job {
	u32 slot;       /* index into the per-CPU counters array */
	u32 cookie;     /* never reused while the tracer runs: late events still map to the right job */
	u32 owner_uid;  /* exits of processes with another real uid are reported */
	u32 flags;      /* JC_JOB_SUBTREE */
};

/* What the filter of tasks in no job's cgroup must still look at (array of one, set by user space):
 * a task outside every job cgroup pays one lookup of this and nothing more when both are 0. */
struct jc_filter {
	u32 subtree_levels;  /* bit L: some JC_JOB_SUBTREE job's cgroup is at depth L */
	u32 pid_jobs;        /* jobs followed by the tgid map (no cgroup2 id) */
	u32 cpu_sums;        /* 1: exits of tasks born in their job add to cpu_sums (the accounting takes CPU
	                      * from the kernel); 0: every job task's exit gets its own `exited` entry (a
	                      * taskstats accounting needs one per task to attribute its record) */
	u32 pad;
};

/* Per job, per CPU.  User space sums the CPUs. */
struct jc_counters {
	u64 forks;        /* tasks created (threads included, like pids.max counts them) */
	u64 fork_failed;  /* clone/clone3/fork/vfork returning an error */
	u64 events_lost;  /* ring/perf buffer full when an event had to be sent */
	u64 ff_last_ns;   /* rate limiter for fork_failed events */
};

/* Kernel lineage record: task id -> the process that created it (its tgid at fork time). */
struct jc_lineage {
	u64 ts_ns;
	u32 ppid;
	u32 cookie;
};

/* Exited task -> job, read (and deleted) by the accounting once per poll.  cpu_ns is the task's
 * sum_exec_runtime at exit (the quantity cgroup cpu.stat adds up), read only when the agent
 * found its offset in the running kernel's BTF (JC_OFF_RUNTIME); then the accounting needs no
 * taskstats record, otherwise 0 and the record of that task arrives over taskstats. */
struct jc_exited {
	u64 ts_ns;
	u32 cookie;
	u32 uid;
	u64 cpu_ns;
};

/* Key of the cpu_sums map: the CPU time (sum_exec_runtime, ns) of the exited tasks of a job that were
 * born in it (forked while it was traced), added up in the kernel per real uid at exit.  Such a task
 * brought no CPU from before the job, so user space needs no record of it: one atomic add per exit
 * instead of a map entry per exit that user space drains and adds up. */
struct jc_cpu_key {
	u32 cookie;
	u32 uid;
};

/* A set*id syscall in flight: filled at sys_enter, completed at sys_exit. */
struct jc_pending {
	u64 ts_ns;
	u32 sys;
	u32 cookie;
	u32 slot;
	u32 old_uid;
	u32 old_gid;
	u32 arg0;
	u32 arg1;
	u32 arg2;
};

/* The one event shape sent to user space. */
struct jc_event {
	u64 ts_ns;       /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	u64 cgroup_id;   /* cgroup2 id of the task */
	u32 kind;        /* enum jc_kind */
	u32 cookie;      /* job */
	u32 pid;         /* tgid */
	u32 tid;
	u32 ppid;        /* original parent (lineage map), 0 when the task predates tracing */
	u32 uid;         /* real uid now (after the syscall for identity events) */
	u32 gid;         /* real gid now */
	u32 old_uid;     /* identity events: real uid before the syscall */
	u32 old_gid;
	s32 ret;         /* syscall return value; exec: old_pid (the exec'ing thread) */
	u32 sys;         /* enum jc_sys */
	u32 arg0;        /* syscall arguments: the ids asked for ((u32)-1 = unchanged) */
	u32 arg1;
	u32 arg2;
	u32 marked;      /* the JC_MARK_* bits of the process (identity/userns events: this one's included) */
	u32 euid;        /* exec, with JC_EXEC_CREDS: the effective uid the kernel gave (global); else (u32)-1 */
	u32 exe_mode;    /* exec, with JC_EXEC_CREDS: i_mode of the file now running (0 = unknown) */
	u32 exe_uid;     /* ... and its owner and group (global ids) */
	u32 exe_gid;
	u32 pad;
	char comm[JC_COMM_LEN];
	char filename[JC_FILENAME_LEN];  /* exec only */
};

#endif /* JOBCAGE_H */
