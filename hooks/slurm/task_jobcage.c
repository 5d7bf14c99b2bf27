/*
 * task/jobcage -- a Slurm task plugin that hands suspend, resume and task adoption to jobcage.
 *
 * Build and install: scripts/build-slurm-plugin.sh (needs gcc and an installed slurmd, no Slurm headers).
 * Enable in slurm.conf (see hooks/slurm/slurm.conf.fragment and docs/batch-systems.md):
 *     TaskPlugin=task/jobcage            (or appended to a list: task/affinity,task/jobcage)
 *     PluginDir=/usr/lib/x86_64-linux-gnu/slurm-wlm:/usr/local/lib/jobcage/slurm
 *
 * What it does (Slurm 22.05; verified by tests/test_slurm_jobcage.py):
 *   task_p_slurmd_suspend_job(JOB)   slurmd, root, before Slurm's SIGTSTP/SIGSTOP:  jobcage suspend JOB
 *                                    (own mode only: see there for attach mode)
 *                                    (the job's cgroup is frozen: every process, daemonized and
 *                                    identity-switched ones included; returns when the kernel says frozen)
 *   task_p_slurmd_resume_job(JOB)    slurmd, root:                                   jobcage resume JOB
 *   task_p_post_set_affinity(...)    slurmstepd, root, after the step's tasks were forked and before
 *                                    they exec (the job id comes from slurmstepd's title "[JOB.STEP]",
 *                                    the tasks are slurmstepd's children that have not exec'd yet):
 *                                    own mode:     jobcage adopt JOB --pid TASK  for every task not yet
 *                                                  adopted;
 *                                    attach mode:  jobcage prologue JOB --uid UID --gid GID --from-pid TASK
 *                                                  once per slurmstepd (every step of the job calls it
 *                                                  again: a no-op once the job is attached).
 *                                    Failure fails the task launch (fail closed, like the TaskProlog).
 *
 * Own or attach (docs/batch-systems.md): attach when Slurm contains the job itself (proctrack/cgroup,
 * task/cgroup: slurmstepd runs inside the job's cgroup job_N, e.g. .../slurmstepd.scope/job_N/step_M/slurm
 * on cgroup/v2), own otherwise (proctrack/linuxproc: slurmstepd stays in slurmd's cgroup).  Slurm 22.05
 * makes job_N only after the Prolog ran, so attach happens here, where the task already is in job_N.
 * JOBCAGE_SLURM_MODE=own|attach overrides the choice read from /proc/self/cgroup.
 *   every other task_p_* callback    no-op, returns success.
 *
 * Every jobcage run is bounded: a child that has not exited after the time limit is SIGKILLed together
 * with its process group, and the callback returns.  A hung suspend would otherwise hold slurmd's
 * per-job suspend lock forever (and with it every later resume of the job).
 *
 * Which jobcage: a `jobcage` next to this .so wins (tests, relocated installs -- the same rule as the
 * hook scripts), else JC_JOBCAGE_BIN (default /usr/local/bin/jobcage).  The child gets slurmd's
 * environment (so JOBCAGE_CONFIG set for slurmd reaches jobcage), stdin /dev/null, and stdout+stderr
 * captured into the log message.  Environment of slurmd/slurmstepd read at each call:
 *   JOBCAGE_SLURM_TIMEOUT   seconds (default JC_TIMEOUT_MS / 1000 = 30)
 *   JOBCAGE_SLURM_ADOPT=0   do not adopt tasks (leave it to the TaskProlog); no attach either
 *   JOBCAGE_SLURM_MODE      own | attach | auto (default: auto, see above)
 * Logging goes through Slurm's public slurm_info()/slurm_error() (to SlurmdLogFile) when the plugin runs
 * inside a Slurm daemon, else to stderr.
 *
 * No Slurm headers are needed: the step and task records stay opaque, and the plugin ABI is just the
 * three symbols plugin_name, plugin_type, plugin_version plus the task_p_* functions below.  Slurm loads
 * a task plugin only if plugin_version equals its own SLURM_VERSION_NUMBER in major, minor AND micro
 * (src/common/plugin.c), so the build script takes it from the installed slurmd: rebuild after every
 * Slurm update (the .so then fails to load and slurmd refuses to start -- it does not run unprotected).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef JC_SLURM_VERSION
#error "build with -DJC_SLURM_VERSION=0xMMmmuu (scripts/build-slurm-plugin.sh derives it from slurmd -V)"
#endif
#ifndef JC_JOBCAGE_BIN
#define JC_JOBCAGE_BIN "/usr/local/bin/jobcage"
#endif
#ifndef JC_TIMEOUT_MS
#define JC_TIMEOUT_MS 30000
#endif

#define JC_SUCCESS 0    /* SLURM_SUCCESS */
#define JC_ERROR (-1)   /* SLURM_ERROR */
#define JC_MAX_TASKS 1024
#define JC_OUT_MAX 512

extern char **environ;

const char plugin_name[] = "jobcage task plugin: freezer suspend/resume, root adoption of tasks";
const char plugin_type[] = "task/jobcage";
const uint32_t plugin_version = JC_SLURM_VERSION;

/* Slurm's public logging functions (spank.h), exported by the daemons.  Weak: when the .so is loaded
 * outside Slurm (tests load it with ctypes) they are NULL and we write to stderr. */
extern void slurm_info(const char *fmt, ...) __attribute__((weak, format(printf, 1, 2)));
extern int slurm_error(const char *fmt, ...) __attribute__((weak, format(printf, 1, 2)));

static void jc_log(int is_error, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void jc_log(int is_error, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (is_error && slurm_error)
		slurm_error("task/jobcage: %s", msg);
	else if (!is_error && slurm_info)
		slurm_info("task/jobcage: %s", msg);
	else
		fprintf(stderr, "task/jobcage: %s%s\n", is_error ? "error: " : "", msg);
}

static double jc_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int jc_timeout_ms(void)
{
	const char *s = getenv("JOBCAGE_SLURM_TIMEOUT");
	char *end;
	double v;

	if (s && *s) {
		v = strtod(s, &end);
		if (*end == '\0' && v > 0 && v < 86400)
			return (int)(v * 1000);
		jc_log(1, "ignoring invalid JOBCAGE_SLURM_TIMEOUT=%s", s);
	}
	return JC_TIMEOUT_MS;
}

/* The jobcage to run: one next to this .so if executable, else the configured default. */
static void jc_bin(char *buf, size_t len)
{
	Dl_info info;
	const char *slash;

	if (dladdr((void *)jc_bin, &info) && info.dli_fname && (slash = strrchr(info.dli_fname, '/'))) {
		snprintf(buf, len, "%.*s/jobcage", (int)(slash - info.dli_fname), info.dli_fname);
		if (access(buf, X_OK) == 0)
			return;
	}
	snprintf(buf, len, "%s", JC_JOBCAGE_BIN);
}

/* --- bounded child processes --------------------------------------------------------------------------- */

struct jc_run {
	pid_t pid;
	int fd;                 /* read end of the child's stdout+stderr, -1 when closed */
	int status;             /* waitpid status */
	int state;              /* 0 running, 1 exited, 2 killed at the time limit, 3 status lost */
	size_t len;
	char out[JC_OUT_MAX];
};

/* Start argv[0] with stdin /dev/null, stdout+stderr into a pipe, its own process group, default signal
 * dispositions and an empty signal mask (the daemons block and ignore signals), no other fds. */
static int jc_spawn(struct jc_run *r, char *const argv[])
{
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t at;
	sigset_t none, dfl;
	int p[2], rc, sig;

	memset(r, 0, sizeof(*r));
	r->fd = -1;
	if (pipe2(p, O_CLOEXEC) < 0)
		return errno;
	sigemptyset(&none);
	sigemptyset(&dfl);
	for (sig = 1; sig < NSIG && sig < 32; sig++)
		if (sig != SIGKILL && sig != SIGSTOP)
			sigaddset(&dfl, sig);
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	posix_spawn_file_actions_adddup2(&fa, p[1], 1);
	posix_spawn_file_actions_adddup2(&fa, p[1], 2);
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 34)
	posix_spawn_file_actions_addclosefrom_np(&fa, 3);
#endif
	posix_spawnattr_init(&at);
	posix_spawnattr_setpgroup(&at, 0);
	posix_spawnattr_setsigmask(&at, &none);
	posix_spawnattr_setsigdefault(&at, &dfl);
	posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
	rc = posix_spawn(&r->pid, argv[0], &fa, &at, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&at);
	close(p[1]);
	if (rc != 0) {
		close(p[0]);
		return rc;
	}
	r->fd = p[0];
	fcntl(r->fd, F_SETFL, O_NONBLOCK);
	return 0;
}

static void jc_drain(struct jc_run *r)
{
	char buf[512];
	ssize_t n;

	while (r->fd >= 0) {
		n = read(r->fd, buf, sizeof(buf));
		if (n > 0) {
			size_t room = sizeof(r->out) - 1 - r->len;
			size_t take = (size_t)n < room ? (size_t)n : room;

			memcpy(r->out + r->len, buf, take);
			r->len += take;
			r->out[r->len] = '\0';
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		close(r->fd);   /* EOF or error */
		r->fd = -1;
	}
}

/* Wait for all runs until the deadline; kill (with their process groups) and reap the rest. */
static void jc_wait_all(struct jc_run *runs, int n, int timeout_ms)
{
	double deadline = jc_now() + timeout_ms / 1000.0;
	struct pollfd pfd[JC_MAX_TASKS];
	int i, k, left;
	pid_t w;

	for (;;) {
		left = 0;
		for (i = 0; i < n; i++) {
			if (runs[i].state != 0)
				continue;
			jc_drain(&runs[i]);
			w = waitpid(runs[i].pid, &runs[i].status, WNOHANG);
			if (w == runs[i].pid) {
				runs[i].state = 1;
				jc_drain(&runs[i]);
			} else if (w < 0 && errno == ECHILD) {
				runs[i].state = 3;   /* reaped by someone else (SIGCHLD ignored?) */
			} else {
				left++;
			}
		}
		if (!left || jc_now() >= deadline)
			break;
		for (i = k = 0; i < n; i++)
			if (runs[i].state == 0 && runs[i].fd >= 0) {
				pfd[k].fd = runs[i].fd;
				pfd[k].events = POLLIN;
				k++;
			}
		/* Output wakes us at once; exit is noticed within 10 ms. */
		poll(pfd, k, 10);
	}
	for (i = 0; i < n; i++) {
		if (runs[i].state == 0) {
			kill(-runs[i].pid, SIGKILL);    /* pid not reaped yet: the group id cannot be reused */
			kill(runs[i].pid, SIGKILL);
			while (waitpid(runs[i].pid, &runs[i].status, 0) < 0 && errno == EINTR)
				;
			runs[i].state = 2;
		}
		jc_drain(&runs[i]);
		if (runs[i].fd >= 0) {
			close(runs[i].fd);
			runs[i].fd = -1;
		}
	}
}

/* One line for the log: the child's output with newlines folded. */
static const char *jc_output(struct jc_run *r)
{
	size_t i;

	while (r->len && (r->out[r->len - 1] == '\n' || r->out[r->len - 1] == ' '))
		r->out[--r->len] = '\0';
	for (i = 0; i < r->len; i++)
		if (r->out[i] == '\n')
			r->out[i] = '|';
	return r->len ? r->out : "(no output)";
}

/* Log one run's outcome; returns JC_SUCCESS if it exited 0. */
static int jc_report(struct jc_run *r, const char *what, double started, int timeout_ms)
{
	double took = jc_now() - started;

	if (r->state == 2) {
		jc_log(1, "%s did not finish within %.1f s: killed (%s)", what, timeout_ms / 1000.0, jc_output(r));
		return JC_ERROR;
	}
	if (r->state == 3) {
		jc_log(1, "%s: exit status lost (child reaped elsewhere) after %.2f s", what, took);
		return JC_ERROR;
	}
	if (WIFEXITED(r->status) && WEXITSTATUS(r->status) == 0) {
		jc_log(0, "%s: ok in %.2f s", what, took);
		return JC_SUCCESS;
	}
	if (WIFEXITED(r->status))
		jc_log(1, "%s failed with exit %d after %.2f s: %s", what, WEXITSTATUS(r->status), took,
		       jc_output(r));
	else
		jc_log(1, "%s killed by signal %d after %.2f s: %s", what, WTERMSIG(r->status), took,
		       jc_output(r));
	return JC_ERROR;
}

/* jobcage VERB JOB, bounded. */
static int jc_job_command(const char *verb, uint32_t job_id)
{
	char bin[PATH_MAX], id[16], what[64];
	char *argv[] = { bin, (char *)verb, id, NULL };
	int timeout_ms = jc_timeout_ms(), rc;
	struct jc_run r;
	double t0 = jc_now();

	jc_bin(bin, sizeof(bin));
	snprintf(id, sizeof(id), "%u", job_id);
	snprintf(what, sizeof(what), "jobcage %s %u", verb, job_id);
	rc = jc_spawn(&r, argv);
	if (rc != 0) {
		jc_log(1, "%s: cannot run %s: %s", what, bin, strerror(rc));
		return JC_ERROR;
	}
	jc_wait_all(&r, 1, timeout_ms);
	return jc_report(&r, what, t0, timeout_ms);
}

/* --- adoption from slurmstepd --------------------------------------------------------------------------- */

static pid_t jc_adopted[JC_MAX_TASKS];
static int jc_nadopted;

/* The job id from slurmstepd's process title "slurmstepd: [JOB.STEP]"; 0 if it is not there. */
static uint32_t jc_stepd_job_id(void)
{
	char buf[256] = "", *p, *end;
	unsigned long v;
	size_t n;
	FILE *f = fopen("/proc/self/cmdline", "r");

	if (!f)
		return 0;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	if (strncmp(buf, "slurmstepd:", 11) != 0 || !(p = strchr(buf, '[')))
		return 0;
	errno = 0;
	v = strtoul(p + 1, &end, 10);
	if (errno || end == p + 1 || (*end != '.' && *end != ']') || v == 0 || v > UINT32_MAX)
		return 0;
	return (uint32_t)v;
}

static int jc_is_adopted(pid_t pid)
{
	int i;

	for (i = 0; i < jc_nadopted; i++)
		if (jc_adopted[i] == pid)
			return 1;
	return 0;
}

/* Our children that are still forked copies of slurmstepd (comm "slurmstepd", not exec'd yet): the
 * step's tasks, waiting for slurmstepd's go-ahead to exec.  Helpers that exec'd something are skipped. */
static int jc_task_children(pid_t *out, int max)
{
	char path[320], line[8192], comm[64];
	char *tok, *save;
	struct dirent *de;
	DIR *d = opendir("/proc/self/task");
	int n = 0;
	FILE *f;

	if (!d)
		return -1;
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/proc/self/task/%s/children", de->d_name);
		if (!(f = fopen(path, "r")))
			continue;
		if (fgets(line, sizeof(line), f)) {
			for (tok = strtok_r(line, " \n", &save); tok && n < max; tok = strtok_r(NULL, " \n", &save)) {
				pid_t pid = (pid_t)atol(tok);
				FILE *c;

				snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
				comm[0] = '\0';
				if ((c = fopen(path, "r"))) {
					if (!fgets(comm, sizeof(comm), c))
						comm[0] = '\0';
					fclose(c);
				}
				if (pid > 0 && strcmp(comm, "slurmstepd\n") == 0)
					out[n++] = pid;
			}
		}
		fclose(f);
	}
	closedir(d);
	return n;
}

static int jc_adopt_tasks(void)
{
	static struct jc_run runs[JC_MAX_TASKS];
	static char pids[JC_MAX_TASKS][16];
	pid_t kids[JC_MAX_TASKS], todo[JC_MAX_TASKS];
	char bin[PATH_MAX], id[16], what[96];
	char *argv[6];
	uint32_t job = jc_stepd_job_id();
	int nkids, n = 0, i, rc = JC_SUCCESS, timeout_ms = jc_timeout_ms();
	double t0 = jc_now();

	if (!job) {
		jc_log(1, "cannot read the job id from slurmstepd's title: tasks not adopted");
		return JC_ERROR;
	}
	nkids = jc_task_children(kids, JC_MAX_TASKS);
	if (nkids < 0) {
		jc_log(1, "job %u: cannot list slurmstepd's children: %s", job, strerror(errno));
		return JC_ERROR;
	}
	for (i = 0; i < nkids; i++)
		if (!jc_is_adopted(kids[i]))
			todo[n++] = kids[i];
	if (n == 0)
		return JC_SUCCESS;
	jc_bin(bin, sizeof(bin));
	snprintf(id, sizeof(id), "%u", job);
	/* All at once: a step with many tasks per node must not pay one jobcage start-up per task in series. */
	for (i = 0; i < n; i++) {
		snprintf(pids[i], sizeof(pids[i]), "%d", (int)todo[i]);
		argv[0] = bin;
		argv[1] = "adopt";
		argv[2] = id;
		argv[3] = "--pid";
		argv[4] = pids[i];
		argv[5] = NULL;
		if ((errno = jc_spawn(&runs[i], argv)) != 0) {
			jc_log(1, "jobcage adopt %u --pid %d: cannot run %s: %s", job, (int)todo[i], bin,
			       strerror(errno));
			jc_wait_all(runs, i, timeout_ms);
			return JC_ERROR;
		}
	}
	jc_wait_all(runs, n, timeout_ms);
	for (i = 0; i < n; i++) {
		snprintf(what, sizeof(what), "jobcage adopt %u --pid %d", job, (int)todo[i]);
		if (jc_report(&runs[i], what, t0, timeout_ms) != JC_SUCCESS)
			rc = JC_ERROR;
		else if (jc_nadopted < JC_MAX_TASKS)
			jc_adopted[jc_nadopted++] = todo[i];
	}
	return rc;
}

/* --- attach mode: Slurm's own cgroup holds the job ------------------------------------------------------ */

static int jc_attached;   /* this slurmstepd attached its job already */

/* 1 if slurmstepd itself sits in a cgroup of the job ("/job_JOB/" in a line of /proc/self/cgroup):
 * Slurm contains the job, jobcage attaches to it instead of moving tasks out. */
static int jc_attach_mode(uint32_t job)
{
	const char *m = getenv("JOBCAGE_SLURM_MODE");
	char line[4096], want[32];
	size_t wl;
	int found = 0;
	FILE *f;

	if (m && strcmp(m, "attach") == 0)
		return 1;
	if (m && strcmp(m, "own") == 0)
		return 0;
	if (m && *m && strcmp(m, "auto") != 0)
		jc_log(1, "ignoring invalid JOBCAGE_SLURM_MODE=%s (own, attach or auto)", m);
	if (!(f = fopen("/proc/self/cgroup", "r")))
		return 0;
	wl = (size_t)snprintf(want, sizeof(want), "/job_%u", job);
	while (!found && fgets(line, sizeof(line), f)) {
		char *p = line;

		while ((p = strstr(p, want)) != NULL) {
			if (p[wl] == '/' || p[wl] == '\n' || p[wl] == '\0') {
				found = 1;
				break;
			}
			p += wl;
		}
	}
	fclose(f);
	return found;
}

/* From slurmd (outside any job): 1 if Slurm made a cgroup for the job (cgroup/v2 under slurmstepd.scope,
 * cgroup/v1 freezer), i.e. Slurm contains it and jobcage is attached; JOBCAGE_SLURM_MODE overrides. */
static int jc_slurm_contains(uint32_t job)
{
	const char *m = getenv("JOBCAGE_SLURM_MODE");
	char pat[2][160];
	glob_t g;
	int i, found = 0;

	if (m && strcmp(m, "attach") == 0)
		return 1;
	if (m && strcmp(m, "own") == 0)
		return 0;
	snprintf(pat[0], sizeof(pat[0]), "/sys/fs/cgroup/system.slice/*slurmstepd.scope/job_%u", job);
	snprintf(pat[1], sizeof(pat[1]), "/sys/fs/cgroup/freezer/slurm*/uid_*/job_%u", job);
	for (i = 0; i < 2 && !found; i++) {
		if (glob(pat[i], GLOB_NOSORT, NULL, &g) == 0)
			found = g.gl_pathc > 0;
		globfree(&g);
	}
	return found;
}

/* The job's uid and gid, from a task that has not exec'd yet.  slurmstepd forks it with effective ids
 * the job's (seteuid), the child takes root back for a moment and then sets all ids to the job's before
 * it waits for the go-ahead to exec: so the first non-root effective id seen is the job's; a task that
 * stays root for a while is a root job's.  No user code has run in it: the ids are Slurm's doing. */
static int jc_task_ids(pid_t pid, unsigned long *uid, unsigned long *gid)
{
	char path[64], line[256];
	double until = jc_now() + 2.0;
	unsigned long r, e, g, ge;
	int have;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	for (;;) {
		have = 0;
		if (!(f = fopen(path, "r")))
			return -1;
		while (fgets(line, sizeof(line), f)) {
			if (sscanf(line, "Uid: %lu %lu", &r, &e) == 2)
				have |= 1;
			else if (sscanf(line, "Gid: %lu %lu", &g, &ge) == 2)
				have |= 2;
		}
		fclose(f);
		if (have != 3)
			return -1;
		if (e != 0 || jc_now() >= until) {
			*uid = e;
			*gid = ge;
			return 0;
		}
		usleep(10000);
	}
}

static int jc_attach_job(uint32_t job)
{
	pid_t kids[JC_MAX_TASKS];
	char bin[PATH_MAX], id[16], uid_s[24], gid_s[24], pid_s[16], what[160];
	char *argv[] = { bin, "prologue", id, "--uid", uid_s, "--gid", gid_s, "--from-pid", pid_s, NULL };
	unsigned long uid, gid;
	int nkids, rc, timeout_ms = jc_timeout_ms();
	struct jc_run r;
	double t0 = jc_now();

	nkids = jc_task_children(kids, JC_MAX_TASKS);
	if (nkids <= 0) {
		jc_log(1, "job %u: no task of slurmstepd found to attach the job from", job);
		return JC_ERROR;
	}
	if (jc_task_ids(kids[0], &uid, &gid) < 0) {
		jc_log(1, "job %u: cannot read the ids of task %d: %s", job, (int)kids[0], strerror(errno));
		return JC_ERROR;
	}
	jc_bin(bin, sizeof(bin));
	snprintf(id, sizeof(id), "%u", job);
	snprintf(uid_s, sizeof(uid_s), "%lu", uid);
	snprintf(gid_s, sizeof(gid_s), "%lu", gid);
	snprintf(pid_s, sizeof(pid_s), "%d", (int)kids[0]);
	snprintf(what, sizeof(what), "jobcage prologue %u --uid %lu --gid %lu --from-pid %d", job, uid, gid,
		 (int)kids[0]);
	rc = jc_spawn(&r, argv);
	if (rc != 0) {
		jc_log(1, "%s: cannot run %s: %s", what, bin, strerror(rc));
		return JC_ERROR;
	}
	jc_wait_all(&r, 1, timeout_ms);
	if (jc_report(&r, what, t0, timeout_ms) != JC_SUCCESS)
		return JC_ERROR;
	jc_attached = 1;
	return JC_SUCCESS;
}

static int jc_adopt_enabled(void)
{
	const char *s = getenv("JOBCAGE_SLURM_ADOPT");

	return !(s && (strcmp(s, "0") == 0 || strcmp(s, "no") == 0 || strcmp(s, "false") == 0));
}

/* --- the plugin interface ------------------------------------------------------------------------------- */

int init(void)
{
	return JC_SUCCESS;
}

int fini(void)
{
	return JC_SUCCESS;
}

int task_p_slurmd_batch_request(void *req)
{
	(void)req;
	return JC_SUCCESS;
}

int task_p_slurmd_launch_request(void *req, uint32_t node_id)
{
	(void)req;
	(void)node_id;
	return JC_SUCCESS;
}

/* slurmd ignores the return value of these two; failures are logged.  Attach mode: Slurm freezes the
 * steps' user cgroups itself, and job_N also holds the steps' slurmstepd (step_M/slurm): frozen by a
 * freeze of job_N, it could not answer slurmd's suspend request that follows this call, and slurmd would
 * hold the job's suspend lock -- and every later resume -- forever.  So leave suspend to Slurm there. */
int task_p_slurmd_suspend_job(uint32_t job_id)
{
	if (jc_slurm_contains(job_id)) {
		jc_log(0, "job %u: in Slurm's own cgroup (attach mode): Slurm freezes its steps", job_id);
		return JC_SUCCESS;
	}
	return jc_job_command("suspend", job_id);
}

int task_p_slurmd_resume_job(uint32_t job_id)
{
	if (jc_slurm_contains(job_id))
		return JC_SUCCESS;
	return jc_job_command("resume", job_id);
}

int task_p_pre_setuid(void *step)
{
	(void)step;
	return JC_SUCCESS;
}

int task_p_pre_set_affinity(void *step, uint32_t node_tid)
{
	(void)step;
	(void)node_tid;
	return JC_SUCCESS;
}

int task_p_set_affinity(void *step, uint32_t node_tid)
{
	(void)step;
	(void)node_tid;
	return JC_SUCCESS;
}

/* Called by slurmstepd (root) once per task after all of the step's tasks were forked and before any
 * of them execs; the first call adopts them all (or attaches the job), the later ones find nothing left
 * to do. */
int task_p_post_set_affinity(void *step, uint32_t node_tid)
{
	uint32_t job;

	(void)step;
	(void)node_tid;
	if (!jc_adopt_enabled() || jc_attached)
		return JC_SUCCESS;
	job = jc_stepd_job_id();
	if (job && jc_attach_mode(job))
		return jc_attach_job(job);
	return jc_adopt_tasks();
}

int task_p_pre_launch(void *step)
{
	(void)step;
	return JC_SUCCESS;
}

int task_p_post_term(void *step, void *task)
{
	(void)step;
	(void)task;
	return JC_SUCCESS;
}

int task_p_post_step(void *step)
{
	(void)step;
	return JC_SUCCESS;
}

int task_p_add_pid(pid_t pid)
{
	(void)pid;
	return JC_SUCCESS;
}
