/* tracer.bpf.c - jobcage identity tracer (bcc).
 *
 * Portability rule (docs: design.md): no kernel struct layout from a header.  Everything comes
 * from tracepoint arguments (layouts read from tracefs at load time) and the helpers
 * bpf_get_current_{pid_tgid,uid_gid,cgroup_id,comm} and bpf_ktime_get_ns -- except a job
 * task's CPU time at exit and, at exec, its effective uid and the exec'd file's mode and owner,
 * read at the offsets the running kernel's BTF names (JC_OFF_*, set by agent/tracer/btf.py; left
 * out when there is no BTF).
 *
 * Configuration is by -D flags set by agent/tracer/bpf_backend.py, never by editing this text:
 *   JC_PID_FILTER        also match jobs by a tgid -> job map that forks inherit (nodes
 *                        without a usable cgroup2 hierarchy)
 *   JC_PERFBUF           perf buffer instead of a ring buffer (kernels without ringbuf)
 *   JC_RINGBUF_PAGES     ring buffer size in pages (power of two)
 *   JC_WAKE_EVERY        every this many records (power of two) wake user space (see ev_submit)
 *   JC_HAVE_GROUP_DEAD   sched_process_exit has the group_dead field
 *   JC_OFF_RUNTIME       byte offset of task_struct.se.sum_exec_runtime (from BTF): exits carry
 *                        their CPU time, and the accounting needs no taskstats listener; with
 *                        filter.cpu_sums set, that of tasks born in the job is summed per (job, uid)
 *   JC_EXEC_CREDS        with JC_OFF_{CRED,CRED_EUID,MM,MM_EXE,FILE_INODE,INODE_MODE,INODE_UID,
 *                        INODE_GID} (from BTF): exec events carry the euid and the file's mode/owner
 *   JC_TP_<SYSCALL>      the syscalls:sys_{enter,exit}_<syscall> tracepoints exist
 *   JC_TP_CLONE_ENTER    sys_enter_clone/clone3 exist (CLONE_NEWUSER is seen at entry)
 *   JC_KPROBES           compile the kp_ and kr_ programs (end of file) that the agent attaches to the
 *                        syscalls' functions instead of any JC_TP_<SYSCALL> tracepoint
 *   JC_SUBTREE           jobs that hold a whole cgroup subtree (attach mode: a batch system's
 *                        job cgroup with its steps below it) are matched through
 *                        bpf_get_current_ancestor_cgroup_id() at the depths in `filter`
 *
 * What reaches user space: exec, identity changes (with return code), setsid, exit of
 * processes whose real uid differs from the job owner's or that changed identity (if an
 * event was sent about them before: see JC_MARK_SEEN), fork failures rate limited, and
 * user-namespace entry (unshare/clone/clone3 with CLONE_NEWUSER, setns) and uid/gid map opens.
 * Forks are only counted: a fork bomb costs map updates, not events.
 *
 * Fork/lineage choice: instead of one event per fork, the fork tracepoint writes
 * child -> parent into an LRU hash (`lineage`), deleted again when the task exits.  Every
 * event carries the original parent from that map, so the audit trail has the lineage of
 * every process that does something interesting (exec, uid change, setsid, non-owner
 * exit) even after it was reparented; user space reads the map in bulk for the rest.
 * Bounded by the job's live tasks, so a fork bomb cannot evict much or flood anything.
 */
#include <uapi/linux/ptrace.h>
#include "jobcage.h"

#if defined(JC_ABI_EXPECTED) && JC_ABI != JC_ABI_EXPECTED
#error "bpf/jobcage.h is of another JC_ABI than the agent that loads it"
#endif

#ifndef JC_RINGBUF_PAGES
#define JC_RINGBUF_PAGES 1024   /* 4 MiB: ~11,000 events of burst */
#endif
#ifndef JC_WAKE_EVERY
#define JC_WAKE_EVERY 2048      /* a power of two, at most a quarter of the ring's records */
#endif

BPF_HASH(jobs, u64, struct jc_job, JC_MAX_JOBS);                 /* cgroup2 id -> job */
BPF_ARRAY(filter, struct jc_filter, 1);   /* what a task in no job cgroup must still look at */
BPF_ARRAY(ns_inflight, u64, 1);   /* clone/clone3 with CLONE_NEWUSER entered and not yet exited (about) */
#ifdef JC_PID_FILTER
BPF_HASH(job_pids, u32, struct jc_job, JC_LINEAGE_ENTRIES);      /* tgid -> job */
#endif
BPF_PERCPU_ARRAY(counters, struct jc_counters, JC_MAX_JOBS);
BPF_TABLE("lru_hash", u32, struct jc_lineage, lineage, JC_LINEAGE_ENTRIES);
BPF_TABLE("lru_hash", u32, struct jc_exited, exited, JC_LINEAGE_ENTRIES);
#ifdef JC_OFF_RUNTIME
BPF_HASH(cpu_sums, struct jc_cpu_key, u64, JC_CPU_SUM_ENTRIES);   /* see struct jc_cpu_key */
#endif
BPF_TABLE("lru_hash", u32, struct jc_pending, pending, JC_PENDING_ENTRIES);
BPF_TABLE("lru_hash", u32, u32, marked, JC_LINEAGE_ENTRIES);    /* tgid -> JC_MARK_* bits */

#ifdef JC_PERFBUF
BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(scratch, struct jc_event, 1);   /* the event is too big for the stack */
#else
BPF_RINGBUF_OUTPUT(events, JC_RINGBUF_PAGES);
BPF_ARRAY(submitted, u64, 1);   /* records submitted, for the fill wakeup (ev_submit) */
#endif

#ifdef JC_SUBTREE
/* The subtree job whose cgroup is an ancestor of the current task's: one helper call and one
 * lookup per depth in use (usually one: Slurm's job_N sits at the same depth for every job),
 * nothing when no such job exists.  The task's own cgroup was looked up already. */
static __always_inline struct jc_job *subtree_job(u32 mask)
{
	if (!mask)
		return 0;
#pragma unroll
	for (int lvl = 1; lvl < JC_MAX_LEVEL; lvl++) {
		if (!(mask & (1u << lvl)))
			continue;
		u64 anc = bpf_get_current_ancestor_cgroup_id(lvl);
		struct jc_job *j = jobs.lookup(&anc);
		if (j && (j->flags & JC_JOB_SUBTREE))
			return j;
	}
	return 0;
}
#endif

/* 1 and a copy of the current task's job in *out (safe to keep across map updates), or 0. */
static __always_inline int current_job(u32 tgid, struct jc_job *out, int *by_pid)
{
	u64 cg = bpf_get_current_cgroup_id();
	struct jc_job *j = jobs.lookup(&cg);

	*by_pid = 0;
	if (!j) {
		/* In no job's own cgroup (nearly every task of the node): one array lookup says whether an
		 * ancestor cgroup or the tgid map could still make it a job's; usually neither. */
		u32 zero = 0;
		struct jc_filter *f = filter.lookup(&zero);
		if (!f)
			return 0;
#ifdef JC_SUBTREE
		j = subtree_job(f->subtree_levels);
#endif
#ifdef JC_PID_FILTER
		if (!j && f->pid_jobs) {
			j = job_pids.lookup(&tgid);
			*by_pid = 1;
		}
#endif
		if (!j)
			return 0;
	}
	__builtin_memcpy(out, j, sizeof(*out));
	return 1;
}

static __always_inline struct jc_counters *counters_of(const struct jc_job *j)
{
	u32 slot = j->slot;
	return counters.lookup(&slot);
}

static __always_inline void count_lost(const struct jc_job *j)
{
	struct jc_counters *c = counters_of(j);
	if (c)
		c->events_lost++;
}

/* Reserve an event; on a full buffer count the loss against the job and return NULL. */
static __always_inline struct jc_event *ev_reserve(const struct jc_job *j)
{
	struct jc_event *e;
#ifdef JC_PERFBUF
	u32 zero = 0;
	e = scratch.lookup(&zero);
#else
	e = events.ringbuf_reserve(sizeof(struct jc_event));
	if (!e)
		count_lost(j);
#endif
	return e;
}

/* No record wakes user space by itself: the agent collects them every poll window (its batching:
 * one transaction per window, not per event).  Only every JC_WAKE_EVERY-th record (a quarter of
 * the ring or less, set by the agent) forces a wakeup, so a burst faster than the window drains
 * early instead of filling the ring.  The count is shared and its read racy: a wakeup more or
 * fewer now and then, never a loss. */
static __always_inline void ev_submit(void *ctx, struct jc_event *e, const struct jc_job *j)
{
#ifdef JC_PERFBUF
	if (events.perf_submit(ctx, e, sizeof(*e)) != 0)
		count_lost(j);
#else
	u32 zero = 0;
	u64 *q = submitted.lookup(&zero);
	u64 flags = BPF_RB_NO_WAKEUP;
	if (q) {
		__sync_fetch_and_add(q, 1);
		if ((*q & (JC_WAKE_EVERY - 1)) == 0)
			flags = BPF_RB_FORCE_WAKEUP;
	}
	events.ringbuf_submit(e, flags);
#endif
}

/* Fill the fields every event has; filename left empty (exec fills it). */
static __always_inline void ev_common(struct jc_event *e, u32 kind, const struct jc_job *j)
{
	u64 id = bpf_get_current_pid_tgid();
	u64 ugid = bpf_get_current_uid_gid();
	u32 tgid = id >> 32;
	struct jc_lineage *l = lineage.lookup(&tgid);

	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->kind = kind;
	e->cookie = j->cookie;
	e->pid = tgid;
	e->tid = (u32)id;
	e->ppid = l ? l->ppid : 0;
	e->uid = (u32)ugid;
	e->gid = ugid >> 32;
	e->old_uid = e->uid;
	e->old_gid = e->gid;
	e->ret = 0;
	e->sys = JC_SYS_NONE;
	e->arg0 = e->arg1 = e->arg2 = (u32)-1;
	u32 *m = marked.lookup(&tgid);
	e->marked = m ? *m : 0;
	e->euid = (u32)-1;
	e->exe_mode = 0;
	e->exe_uid = e->exe_gid = (u32)-1;
	e->pad = 0;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	e->filename[0] = 0;
}

static __always_inline void mark(u32 tgid, u32 bits)
{
	u32 *m = marked.lookup(&tgid);
	if (m)
		*m |= bits;   /* racy only between threads of one process: harmless */
	else
		marked.update(&tgid, &bits);
}

/* SEEN matters only for a process whose exit may be reported: one with marks already (inherited
 * CHANGED/USERNS) or of another real uid than the owner's.  An owner's unchanged process (nearly every
 * exec of a job) gets no entry: one map insert and one delete less per exec.  A later identity change
 * marks it through id_exit. */
static __always_inline void mark_seen(u32 tgid, const struct jc_job *j)
{
	u32 *m = marked.lookup(&tgid);
	if (m) {
		*m |= JC_MARK_SEEN;
	} else if ((u32)bpf_get_current_uid_gid() != j->owner_uid) {
		u32 bits = JC_MARK_SEEN;
		marked.update(&tgid, &bits);
	}
}

/* ---- process lifecycle ---------------------------------------------------------- */

TRACEPOINT_PROBE(sched, sched_process_fork)
{
	/* Runs in the parent.  args->child_pid may be a thread: its lineage entry is
	 * removed again when it exits (user space shows only processes). */
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct jc_job j;
	int by_pid;

	if (!current_job(tgid, &j, &by_pid))
		return 0;
	struct jc_counters *c = counters_of(&j);
	if (c)
		c->forks++;

	u32 child = args->child_pid;
	struct jc_lineage l = {};
	l.ts_ns = bpf_ktime_get_ns();
	l.ppid = tgid;
	l.cookie = j.cookie;
	lineage.update(&child, &l);

	/* Children inherit CHANGED and USERNS (not SEEN).  The child of a clone(CLONE_NEWUSER) in flight
	 * (its sys_enter left a pending record of this thread) starts in the new namespace. */
	u32 *m = marked.lookup(&tgid);
	u32 inh = m ? (*m & JC_MARK_INHERITED) : 0;
	u32 zero = 0;
	u64 *nsf = ns_inflight.lookup(&zero);
	if (nsf && *nsf) {
		u32 tid = (u32)bpf_get_current_pid_tgid();
		struct jc_pending *pp = pending.lookup(&tid);
		if (pp && (pp->sys == JC_SYS_CLONE || pp->sys == JC_SYS_CLONE3))
			inh |= JC_MARK_INHERITED;
	}
	if (inh)
		marked.update(&child, &inh);
#ifdef JC_PID_FILTER
	if (by_pid)
		job_pids.update(&child, &j);
#endif
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct jc_job j;
	int by_pid;

	if (!current_job(tgid, &j, &by_pid))
		return 0;
	struct jc_event *e = ev_reserve(&j);
	if (!e)
		return 0;
	ev_common(e, JC_EV_EXEC, &j);
	e->ret = args->old_pid;
	TP_DATA_LOC_READ_STR(&e->filename, filename, sizeof(e->filename));
#ifdef JC_EXEC_CREDS
	/* The exec is done (credentials committed, mm->exe_file set): what the kernel decided, read at
	 * the running kernel's BTF offsets.  User space would otherwise stat the path afterwards, which by
	 * then may name another file (a symlink swapped right after the exec). */
	{
		u64 task = bpf_get_current_task(), p = 0;
		u32 v = 0;
		u16 mode = 0;
		if (bpf_probe_read_kernel(&p, sizeof(p), (void *)(task + JC_OFF_CRED)) == 0 && p &&
		    bpf_probe_read_kernel(&v, sizeof(v), (void *)(p + JC_OFF_CRED_EUID)) == 0)
			e->euid = v;
		if (bpf_probe_read_kernel(&p, sizeof(p), (void *)(task + JC_OFF_MM)) == 0 && p &&
		    bpf_probe_read_kernel(&p, sizeof(p), (void *)(p + JC_OFF_MM_EXE)) == 0 && p &&
		    bpf_probe_read_kernel(&p, sizeof(p), (void *)(p + JC_OFF_FILE_INODE)) == 0 && p &&
		    bpf_probe_read_kernel(&mode, sizeof(mode), (void *)(p + JC_OFF_INODE_MODE)) == 0 && mode) {
			if (bpf_probe_read_kernel(&v, sizeof(v), (void *)(p + JC_OFF_INODE_UID)) == 0)
				e->exe_uid = v;
			if (bpf_probe_read_kernel(&v, sizeof(v), (void *)(p + JC_OFF_INODE_GID)) == 0)
				e->exe_gid = v;
			e->exe_mode = mode;
		}
	}
#endif
	ev_submit(args, e, &j);
	mark_seen(tgid, &j);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	struct jc_job j;
	int by_pid;

	if (!current_job(tgid, &j, &by_pid))
		return 0;
#ifdef JC_HAVE_GROUP_DEAD
	int group_dead = args->group_dead;
#else
	int group_dead = (tid == tgid);   /* the leader usually goes last */
#endif
	/* For the accounting: the taskstats record of this task names only its pid. */
	struct jc_exited x = {};
	x.uid = (u32)bpf_get_current_uid_gid();
#ifdef JC_OFF_RUNTIME
	/* task_struct.se.sum_exec_runtime: the offset is the running kernel's, from its BTF (what
	 * CO-RE would relocate), so no header's struct layout is trusted; read as plain memory */
	bpf_probe_read_kernel(&x.cpu_ns, sizeof(x.cpu_ns), (void *)(bpf_get_current_task() + JC_OFF_RUNTIME));
	/* Born in this job (its fork was seen under the same cookie): all its CPU is the job's, added to
	 * the (job, uid) sum.  Anything else (a task adopted or seeded, whose CPU from before the job user
	 * space subtracts, or a full sums map) goes the per-task way below. */
	u32 zero = 0;
	struct jc_filter *f = filter.lookup(&zero);
	struct jc_lineage *born = f && f->cpu_sums ? lineage.lookup(&tid) : 0;
	int summed = 0;
	if (born && born->cookie == j.cookie) {
		struct jc_cpu_key k = {.cookie = j.cookie, .uid = x.uid};
		u64 *sum = cpu_sums.lookup(&k);
		if (!sum) {
			u64 none = 0;
			cpu_sums.insert(&k, &none);   /* BPF_NOEXIST: a racing first insert elsewhere is kept, not replaced */
			sum = cpu_sums.lookup(&k);
		}
		if (sum) {
			__sync_fetch_and_add(sum, x.cpu_ns);
			summed = 1;
		}
	}
	if (!summed)
#endif
	{
		x.ts_ns = bpf_ktime_get_ns();
		x.cookie = j.cookie;
		exited.update(&tid, &x);
	}

	if (tid != tgid) {   /* a thread: its fork-time entries are of no further use */
		lineage.delete(&tid);
#ifdef JC_PID_FILTER
		job_pids.delete(&tid);
#endif
	}
	if (!group_dead)
		return 0;

	u32 *m = marked.lookup(&tgid);
	u32 bits = m ? *m : 0;
	if ((bits & JC_MARK_SEEN) && (x.uid != j.owner_uid || (bits & JC_MARK_CHANGED))) {
		struct jc_event *e = ev_reserve(&j);
		if (e) {
			ev_common(e, JC_EV_EXIT, &j);   /* reads lineage: before the delete below */
			e->pid = tgid;
			e->marked = bits;
			ev_submit(args, e, &j);
		}
	}
	lineage.delete(&tgid);
	if (m)
		marked.delete(&tgid);
#ifdef JC_PID_FILTER
	job_pids.delete(&tgid);
#endif
	return 0;
}

/* ---- identity changes ------------------------------------------------------------ */

/* sys_enter: remember the old ids and the requested ones, keyed by thread. */
static __always_inline int id_enter(u32 sys, u32 a0, u32 a1, u32 a2)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	struct jc_job j;
	int by_pid;

	if (!current_job(tgid, &j, &by_pid))
		return 0;
	u64 ugid = bpf_get_current_uid_gid();
	struct jc_pending p = {};
	p.ts_ns = bpf_ktime_get_ns();
	p.sys = sys;
	p.cookie = j.cookie;
	p.slot = j.slot;
	p.old_uid = (u32)ugid;
	p.old_gid = ugid >> 32;
	p.arg0 = a0;
	p.arg1 = a1;
	p.arg2 = a2;
	pending.update(&tid, &p);
	if (sys == JC_SYS_CLONE || sys == JC_SYS_CLONE3) {
		u32 zero = 0;
		u64 *nsf = ns_inflight.lookup(&zero);
		if (nsf)
			__sync_fetch_and_add(nsf, 1);
	}
	return 0;
}

/* sys_exit: one event with old ids, requested ids, new real ids and the return code. */
static __always_inline int id_exit(void *ctx, long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	struct jc_pending *pp = pending.lookup(&tid);

	if (!pp)
		return 0;
	struct jc_pending p;
	__builtin_memcpy(&p, pp, sizeof(p));
	pending.delete(&tid);

	struct jc_job j = {};
	j.slot = p.slot;
	j.cookie = p.cookie;
	/* A process that entered a user namespace counts as changed: its ids mean something else now.
	 * (setns with nstype 0 may have joined another kind: USERNS only sends user space to look.) */
	u32 bits = JC_MARK_SEEN;
	if (ret == 0)
		bits |= JC_MARK_CHANGED | (p.sys == JC_SYS_UNSHARE || p.sys == JC_SYS_SETNS ? JC_MARK_USERNS : 0);
	if (p.sys == JC_SYS_CLONE || p.sys == JC_SYS_CLONE3) {
		u32 zero = 0;
		u64 *nsf = ns_inflight.lookup(&zero);
		if (nsf && *nsf)
			__sync_fetch_and_sub(nsf, 1);
	}
	mark(tgid, bits);
	struct jc_event *e = ev_reserve(&j);
	if (!e)
		return 0;
	ev_common(e, p.sys >= JC_SYS_UNSHARE ? JC_EV_USERNS : (p.sys >= JC_SYS_SETGID) ? JC_EV_SETGID : JC_EV_SETUID,
		  &j);
	e->old_uid = p.old_uid;
	e->old_gid = p.old_gid;
	e->sys = p.sys;
	e->arg0 = p.arg0;
	e->arg1 = p.arg1;
	e->arg2 = p.arg2;
	e->ret = ret;
	ev_submit(ctx, e, &j);
	return 0;
}

#define U32(x) ((u32)(x))
#define NOARG ((u32)-1)

#ifdef JC_TP_SETUID
TRACEPOINT_PROBE(syscalls, sys_enter_setuid) { return id_enter(JC_SYS_SETUID, U32(args->uid), NOARG, NOARG); }
TRACEPOINT_PROBE(syscalls, sys_exit_setuid) { return id_exit(args, args->ret); }
#endif
#ifdef JC_TP_SETREUID
TRACEPOINT_PROBE(syscalls, sys_enter_setreuid) { return id_enter(JC_SYS_SETREUID, U32(args->ruid), U32(args->euid), NOARG); }
TRACEPOINT_PROBE(syscalls, sys_exit_setreuid) { return id_exit(args, args->ret); }
#endif
#ifdef JC_TP_SETRESUID
TRACEPOINT_PROBE(syscalls, sys_enter_setresuid) { return id_enter(JC_SYS_SETRESUID, U32(args->ruid), U32(args->euid), U32(args->suid)); }
TRACEPOINT_PROBE(syscalls, sys_exit_setresuid) { return id_exit(args, args->ret); }
#endif
#ifdef JC_TP_SETGID
TRACEPOINT_PROBE(syscalls, sys_enter_setgid) { return id_enter(JC_SYS_SETGID, U32(args->gid), NOARG, NOARG); }
TRACEPOINT_PROBE(syscalls, sys_exit_setgid) { return id_exit(args, args->ret); }
#endif
#ifdef JC_TP_SETREGID
TRACEPOINT_PROBE(syscalls, sys_enter_setregid) { return id_enter(JC_SYS_SETREGID, U32(args->rgid), U32(args->egid), NOARG); }
TRACEPOINT_PROBE(syscalls, sys_exit_setregid) { return id_exit(args, args->ret); }
#endif
#ifdef JC_TP_SETRESGID
TRACEPOINT_PROBE(syscalls, sys_enter_setresgid) { return id_enter(JC_SYS_SETRESGID, U32(args->rgid), U32(args->egid), U32(args->sgid)); }
TRACEPOINT_PROBE(syscalls, sys_exit_setresgid) { return id_exit(args, args->ret); }
#endif
#ifdef JC_TP_SETGROUPS
/* arg0 = number of groups; the list itself is user memory we do not read. */
TRACEPOINT_PROBE(syscalls, sys_enter_setgroups) { return id_enter(JC_SYS_SETGROUPS, U32(args->gidsetsize), NOARG, NOARG); }
TRACEPOINT_PROBE(syscalls, sys_exit_setgroups) { return id_exit(args, args->ret); }
#endif

static __always_inline int setsid_exit(void *ctx, long ret)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct jc_job j;
	int by_pid;

	if (!current_job(tgid, &j, &by_pid))
		return 0;
	struct jc_event *e = ev_reserve(&j);
	if (!e)
		return 0;
	ev_common(e, JC_EV_SETSID, &j);
	e->sys = JC_SYS_SETSID;
	e->ret = ret;
	ev_submit(ctx, e, &j);
	mark_seen(tgid, &j);
	return 0;
}
#ifdef JC_TP_SETSID
TRACEPOINT_PROBE(syscalls, sys_exit_setsid) { return setsid_exit(args, args->ret); }
#endif

/* ---- failed forks ------------------------------------------------------------------ */

static __always_inline int fork_exit(void *ctx, long ret)
{
	if (ret >= 0)   /* the common case, before any map lookup */
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct jc_job j;
	int by_pid;

	if (!current_job(tgid, &j, &by_pid))
		return 0;
	struct jc_counters *c = counters_of(&j);
	if (!c)
		return 0;
	c->fork_failed++;
	/* Per-CPU counters make this limiter race free: <= 1 event/s per job per CPU. */
	u64 now = bpf_ktime_get_ns();
	if (c->ff_last_ns && now - c->ff_last_ns < JC_NS_PER_SEC)
		return 0;
	c->ff_last_ns = now;
	struct jc_event *e = ev_reserve(&j);
	if (!e)
		return 0;
	ev_common(e, JC_EV_FORK_FAILED, &j);
	e->ret = ret;
	ev_submit(ctx, e, &j);
	return 0;
}

/* clone/clone3 with CLONE_NEWUSER also end a pending userns record (see user namespaces below). */
/* Runs twice per fork of the node (child and parent return): the child (ret 0) has nothing to say, the parent
 * looks for a pending record only while some userns clone is in flight (ns_inflight; a task killed inside the
 * syscall leaves it high, which only costs the lookup). */
static __always_inline int clone_exit(void *ctx, long ret)
{
	if (ret == 0)
		return 0;
#if defined(JC_TP_CLONE_ENTER) || defined(JC_KPROBES)
	u32 zero = 0;
	u64 *nsf = ns_inflight.lookup(&zero);
	if (nsf && *nsf)
		id_exit(ctx, ret);
#endif
	return fork_exit(ctx, ret);
}
#ifdef JC_TP_CLONE
TRACEPOINT_PROBE(syscalls, sys_exit_clone) { return clone_exit(args, args->ret); }
#endif
#ifdef JC_TP_CLONE3
TRACEPOINT_PROBE(syscalls, sys_exit_clone3) { return clone_exit(args, args->ret); }
#endif
#ifdef JC_TP_FORK
TRACEPOINT_PROBE(syscalls, sys_exit_fork) { return fork_exit(args, args->ret); }
#endif
#ifdef JC_TP_VFORK
TRACEPOINT_PROBE(syscalls, sys_exit_vfork) { return fork_exit(args, args->ret); }
#endif

/* ---- user namespaces --------------------------------------------------------------- */

/* unshare/clone/clone3 with CLONE_NEWUSER and setns go through the set*id path: sys_enter keeps
 * a pending record, sys_exit sends one JC_EV_USERNS event with the return code (clone: the child's
 * pid).  The flag test comes before any map lookup: plain forks pay one bit test.  Which namespace
 * it is (inode, owner, maps) user space reads from /proc: the programs read no kernel struct. */
#ifdef JC_TP_UNSHARE
TRACEPOINT_PROBE(syscalls, sys_enter_unshare)
{
	if (!(args->unshare_flags & JC_CLONE_NEWUSER))
		return 0;
	return id_enter(JC_SYS_UNSHARE, U32(args->unshare_flags), NOARG, NOARG);
}
TRACEPOINT_PROBE(syscalls, sys_exit_unshare) { return id_exit(args, args->ret); }
#endif
#if defined(JC_TP_CLONE_ENTER) && defined(JC_TP_CLONE)
TRACEPOINT_PROBE(syscalls, sys_enter_clone)
{
	if (!(args->clone_flags & JC_CLONE_NEWUSER))
		return 0;
	return id_enter(JC_SYS_CLONE, U32(args->clone_flags), NOARG, NOARG);
}
#endif
#if defined(JC_TP_CLONE_ENTER) && defined(JC_TP_CLONE3)
TRACEPOINT_PROBE(syscalls, sys_enter_clone3)
{
	u64 flags = 0;   /* struct clone_args starts with its u64 flags: user memory, not a kernel struct */
	if (bpf_probe_read_user(&flags, sizeof(flags), (void *)args->uargs) || !(flags & JC_CLONE_NEWUSER))
		return 0;
	return id_enter(JC_SYS_CLONE3, U32(flags), NOARG, NOARG);
}
#endif
#ifdef JC_TP_SETNS
TRACEPOINT_PROBE(syscalls, sys_enter_setns)
{
	/* nstype 0 (any) or with CLONE_NEWUSER: maybe a user namespace; user space looks at what changed */
	if (args->flags && !(args->flags & JC_CLONE_NEWUSER))
		return 0;
	return id_enter(JC_SYS_SETNS, U32(args->fd), U32(args->flags), NOARG);
}
TRACEPOINT_PROBE(syscalls, sys_exit_setns) { return id_exit(args, args->ret); }
#endif

/* Open for writing of a uid_map or gid_map (newuidmap/newgidmap, unshare -r, a runtime): one
 * event with the path as passed, so user space can read the map that is being written and name
 * the writer.  Read-only opens (nearly all) return after one bit test. */
static __always_inline int nsmap_open(void *ctx, int dfd, const char *filename, int flags)
{
	if ((flags & 3) == 0)   /* O_RDONLY */
		return 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct jc_job j;
	int by_pid;

	if (!current_job(tgid, &j, &by_pid))
		return 0;
	char path[JC_NSPATH_LEN] = {};
	long n = bpf_probe_read_user_str(path, sizeof(path), filename);
	if (n < 8 || n > JC_NSPATH_LEN)   /* n counts the NUL; a longer path is not looked at */
		return 0;
	u32 end = (u32)(n - 1);   /* index of the NUL */
	const char tail[] = "id_map";
	char c = path[(end - 7) & (JC_NSPATH_LEN - 1)];
	if (c != 'u' && c != 'g')
		return 0;
#pragma unroll
	for (int i = 0; i < 6; i++)
		if (path[(end - 6 + i) & (JC_NSPATH_LEN - 1)] != tail[i])
			return 0;
	if (end > 7 && path[(end - 8) & (JC_NSPATH_LEN - 1)] != '/')
		return 0;
	struct jc_event *e = ev_reserve(&j);
	if (!e)
		return 0;
	ev_common(e, JC_EV_USERNS, &j);
	e->sys = JC_SYS_MAP;
	e->arg0 = (u32)dfd;
	e->arg1 = (u32)flags;
	__builtin_memcpy(e->filename, path, JC_NSPATH_LEN);
	ev_submit(ctx, e, &j);
	mark_seen(tgid, &j);
	return 0;
}

#ifdef JC_TP_OPENAT
TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return nsmap_open(args, args->dfd, args->filename, args->flags); }
#endif
#ifdef JC_TP_OPEN
TRACEPOINT_PROBE(syscalls, sys_enter_open) { return nsmap_open(args, -100 /* AT_FDCWD */, args->filename, args->flags); }
#endif

/* ---- the same syscalls through kprobes (JC_KPROBES) --------------------------------
 *
 * Why: while any syscalls:* tracepoint is in use the kernel sends every syscall of every task of the node
 * through its slow path (SYSCALL_WORK_SYSCALL_TRACEPOINT; ~30-40 ns each on the CI VMs, see docs/benchmarks.md), so
 * a job that makes many cheap syscalls pays for tracing that never concerns it.  A kprobe costs only when
 * its own function runs.  Where the kernel has kprobes (x86-64 only: the agent attaches these to the
 * __x64_sys_* and __ia32_sys_* wrappers, else falls back to the tracepoints above) the programs below
 * replace every syscall tracepoint; the sched tracepoints stay.
 *
 * The wrappers (4.17+) take one argument: the user register frame of the syscall, laid out as the ptrace
 * ABI's user_regs_struct (an ABI, not a kernel struct that moves); the arguments are read from there. */
#ifdef JC_KPROBES
/* Byte offsets in the register frame (user_regs_struct): an x86-64 syscall's arguments are in di, si, dx; a
 * 32-bit one's (int 0x80 or sysenter: the __ia32_sys_* functions) in bx, cx, dx.  The 32-bit calls are hooked
 * too: the syscall tracepoints never see them, so with tracepoints a payload can change identity unseen. */
#define R_BX 40
#define R_CX 88
#define R_DX 96
#define R_SI 104
#define R_DI 112

static __always_inline u64 sysarg(struct pt_regs *ctx, int off)
{
	u64 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (void *)(PT_REGS_PARM1(ctx) + off));
	return v;
}
/* an id of the old 16-bit calls (setuid16 ...), where -1 is 0xffff */
static __always_inline u32 id16(u64 v)
{
	v &= 0xffff;
	return v == 0xffff ? NOARG : (u32)v;
}
#define A(r) U32(sysarg(ctx, r))
#define A16(r) id16(sysarg(ctx, r))
#define RET ((long)PT_REGS_RC(ctx))

/* kp_<name>: x86-64; kp32_<name>: the 32-bit call; kp16_<name>: its 16-bit-id variant */
#define KP_ID1(name, sys) \
	int kp_##name(struct pt_regs *ctx) { return id_enter(sys, A(R_DI), NOARG, NOARG); } \
	int kp32_##name(struct pt_regs *ctx) { return id_enter(sys, A(R_BX), NOARG, NOARG); } \
	int kp16_##name(struct pt_regs *ctx) { return id_enter(sys, A16(R_BX), NOARG, NOARG); }
#define KP_ID2(name, sys) \
	int kp_##name(struct pt_regs *ctx) { return id_enter(sys, A(R_DI), A(R_SI), NOARG); } \
	int kp32_##name(struct pt_regs *ctx) { return id_enter(sys, A(R_BX), A(R_CX), NOARG); } \
	int kp16_##name(struct pt_regs *ctx) { return id_enter(sys, A16(R_BX), A16(R_CX), NOARG); }
#define KP_ID3(name, sys) \
	int kp_##name(struct pt_regs *ctx) { return id_enter(sys, A(R_DI), A(R_SI), A(R_DX)); } \
	int kp32_##name(struct pt_regs *ctx) { return id_enter(sys, A(R_BX), A(R_CX), A(R_DX)); } \
	int kp16_##name(struct pt_regs *ctx) { return id_enter(sys, A16(R_BX), A16(R_CX), A16(R_DX)); }
KP_ID1(setuid, JC_SYS_SETUID)
KP_ID2(setreuid, JC_SYS_SETREUID)
KP_ID3(setresuid, JC_SYS_SETRESUID)
KP_ID1(setgid, JC_SYS_SETGID)
KP_ID2(setregid, JC_SYS_SETREGID)
KP_ID3(setresgid, JC_SYS_SETRESGID)
/* arg0 = number of groups (an int in every variant) */
int kp_setgroups(struct pt_regs *ctx) { return id_enter(JC_SYS_SETGROUPS, A(R_DI), NOARG, NOARG); }
int kp32_setgroups(struct pt_regs *ctx) { return id_enter(JC_SYS_SETGROUPS, A(R_BX), NOARG, NOARG); }
/* the return of every syscall that id_enter left a pending record for (set*id, unshare, setns) */
int kr_id(struct pt_regs *ctx) { return id_exit(ctx, RET); }
int kr_setsid(struct pt_regs *ctx) { return setsid_exit(ctx, RET); }
int kr_clone(struct pt_regs *ctx) { return clone_exit(ctx, RET); }
int kr_fork(struct pt_regs *ctx) { return fork_exit(ctx, RET); }

static __always_inline int unshare_enter(u32 flags)
{
	if (!(flags & JC_CLONE_NEWUSER))
		return 0;
	return id_enter(JC_SYS_UNSHARE, flags, NOARG, NOARG);
}
int kp_unshare(struct pt_regs *ctx) { return unshare_enter(A(R_DI)); }
int kp32_unshare(struct pt_regs *ctx) { return unshare_enter(A(R_BX)); }

static __always_inline int clone_enter(u32 flags)
{
	if (!(flags & JC_CLONE_NEWUSER))
		return 0;
	return id_enter(JC_SYS_CLONE, flags, NOARG, NOARG);
}
int kp_clone(struct pt_regs *ctx) { return clone_enter(A(R_DI)); }   /* flags come first in both ABIs */
int kp32_clone(struct pt_regs *ctx) { return clone_enter(A(R_BX)); }

static __always_inline int clone3_enter(u64 uargs)
{
	u64 flags = 0;   /* struct clone_args starts with its u64 flags (user memory, the same for 32-bit callers) */
	if (bpf_probe_read_user(&flags, sizeof(flags), (void *)uargs) || !(flags & JC_CLONE_NEWUSER))
		return 0;
	return id_enter(JC_SYS_CLONE3, U32(flags), NOARG, NOARG);
}
int kp_clone3(struct pt_regs *ctx) { return clone3_enter(sysarg(ctx, R_DI)); }
int kp32_clone3(struct pt_regs *ctx) { return clone3_enter(U32(sysarg(ctx, R_BX))); }

static __always_inline int setns_enter(u32 fd, u32 nstype)
{
	if (nstype && !(nstype & JC_CLONE_NEWUSER))
		return 0;
	return id_enter(JC_SYS_SETNS, fd, nstype, NOARG);
}
int kp_setns(struct pt_regs *ctx) { return setns_enter(A(R_DI), A(R_SI)); }
int kp32_setns(struct pt_regs *ctx) { return setns_enter(A(R_BX), A(R_CX)); }

int kp_openat(struct pt_regs *ctx)
{
	return nsmap_open(ctx, (int)A(R_DI), (const char *)sysarg(ctx, R_SI), (int)A(R_DX));
}
int kp32_openat(struct pt_regs *ctx)
{
	return nsmap_open(ctx, (int)A(R_BX), (const char *)(u64)A(R_CX), (int)A(R_DX));
}
int kp_open(struct pt_regs *ctx)
{
	return nsmap_open(ctx, -100 /* AT_FDCWD */, (const char *)sysarg(ctx, R_DI), (int)A(R_SI));
}
int kp32_open(struct pt_regs *ctx)
{
	return nsmap_open(ctx, -100 /* AT_FDCWD */, (const char *)(u64)A(R_BX), (int)A(R_CX));
}
#endif
