/* Isolation probe, run inside an imago instance by tests/isolation.rs.
 * Every check prints one line: "ok NAME detail" when the instance is refused or cannot see,
 * "ESCAPE NAME detail" when it can. The last line is "probe-done CHECKS" so that a test knows
 * the program really ran to the end. Usage:
 *   probe all NET SELF_MARKER HOST_MARKER OTHER_MARKER HOST_PORT PIDS_LIMIT MEMORY_LIMIT
 *   probe euid            (prints "euid=N", for the setuid check)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/keyctl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int checks;

static void report(int refused, const char *name, const char *detail) {
    checks++;
    printf("%s %s %s\n", refused ? "ok" : "ESCAPE", name, detail);
    fflush(stdout);
}

/* A syscall's result: refused when it returned -1. */
static void expect_fail(const char *name, long rc) {
    char d[128];
    if (rc == -1)
        snprintf(d, sizeof d, "errno=%d(%s)", errno, strerror(errno));
    else
        snprintf(d, sizeof d, "succeeded rc=%ld", rc);
    report(rc == -1, name, d);
}

static void open_write(const char *name, const char *path, int flags) {
    int fd = open(path, flags, 0644);
    if (fd >= 0) {
        /* Opening is not yet writing: /proc and /sys files can refuse at write. */
        ssize_t n = write(fd, "0", 1);
        int e = errno;
        close(fd);
        char d[160];
        snprintf(d, sizeof d, "%s opened, write %s", path, n == 1 ? "succeeded" : strerror(e));
        report(n != 1, name, d);
        return;
    }
    char d[160];
    snprintf(d, sizeof d, "%s errno=%d(%s)", path, errno, strerror(errno));
    report(1, name, d);
}

/* A file that must read as nothing: missing, unreadable or empty. */
static void expect_unreadable(const char *name, const char *path) {
    char buf[64], d[160];
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        snprintf(d, sizeof d, "%s errno=%d(%s)", path, errno, strerror(errno));
        report(1, name, d);
        return;
    }
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    snprintf(d, sizeof d, "%s read %zd bytes", path, n);
    report(n <= 0, name, d);
}

static void expect_empty_dir(const char *name, const char *path) {
    char d[400];
    DIR *dir = opendir(path);
    if (!dir) {
        snprintf(d, sizeof d, "%s errno=%d(%s)", path, errno, strerror(errno));
        report(1, name, d);
        return;
    }
    int n = 0;
    struct dirent *e;
    char first[300] = "";
    while ((e = readdir(dir))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            if (!n) snprintf(first, sizeof first, "%s", e->d_name);
            n++;
        }
    }
    closedir(dir);
    snprintf(d, sizeof d, "%s has %d entries (%s)", path, n, first);
    report(n == 0, name, d);
}

/* Scans every /proc/PID/cmdline for a marker; returns how many processes hold it. */
static int processes_with(const char *marker) {
    DIR *dir = opendir("/proc");
    if (!dir) return -1;
    int found = 0;
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        char path[300], buf[4096];
        snprintf(path, sizeof path, "/proc/%s/cmdline", e->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) continue;
        for (ssize_t i = 0; i < n; i++)
            if (!buf[i]) buf[i] = ' ';
        buf[n] = 0;
        if (strstr(buf, marker)) found++;
    }
    closedir(dir);
    return found;
}

static void status_line(const char *key, char *out, size_t len) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    out[0] = 0;
    if (!f) return;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, strlen(key))) {
            line[strcspn(line, "\n")] = 0;
            snprintf(out, len, "%s", line + strlen(key));
            while (*out == ' ' || *out == '\t') memmove(out, out + 1, strlen(out));
        }
    fclose(f);
}

static int tcp_connect(const char *addr, int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, addr, &sa.sin_addr);
    struct timeval tv = {.tv_sec = 2};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int rc = connect(s, (struct sockaddr *)&sa, sizeof sa);
    int e = errno;
    close(s);
    errno = e;
    return rc;
}

int main(int argc, char **argv) {
    char d[256];
    if (argc > 1 && !strcmp(argv[1], "euid")) {
        printf("euid=%d\n", geteuid());
        return 0;
    }
    if (argc != 9 || strcmp(argv[1], "all")) {
        fprintf(stderr, "usage: probe all NET SELF HOST OTHER PORT PIDS MEMORY\n");
        return 2;
    }
    /* The host's and the other instance's markers are given without their prefix, so that this
     * program's own command line does not hold them. */
    const char *net = argv[2], *self_marker = argv[3];
    char host_marker[200], other_marker[200];
    snprintf(host_marker, sizeof host_marker, "host-marker-%s", argv[4]);
    snprintf(other_marker, sizeof other_marker, "other-marker-%s", argv[5]);
    int host_port = atoi(argv[6]), pids_limit = atoi(argv[7]);
    long memory_limit = atol(argv[8]);
    char gateway[32] = "none";
    {
        /* The default route's gateway: the host's end of the veth. */
        FILE *f = fopen("/proc/net/route", "r");
        char line[256], ifname[32];
        unsigned dest, gw;
        while (f && fgets(line, sizeof line, f))
            if (sscanf(line, "%31s %x %x", ifname, &dest, &gw) == 3 && dest == 0 && gw) {
                struct in_addr a = {.s_addr = gw};
                snprintf(gateway, sizeof gateway, "%s", inet_ntoa(a));
            }
        if (f) fclose(f);
    }

    /* The root filesystem and the files of /proc and /sys. */
    open_write("rootfs-create", "/probe-created", O_WRONLY | O_CREAT);
    open_write("rootfs-overwrite", "/bin/busybox", O_WRONLY);
    open_write("proc-sys-write", "/proc/sys/kernel/domainname", O_WRONLY);
    open_write("proc-sys-vm-write", "/proc/sys/vm/drop_caches", O_WRONLY);
    open_write("sysrq-trigger", "/proc/sysrq-trigger", O_WRONLY);
    open_write("sys-write", "/sys/kernel/mm/transparent_hugepage/enabled", O_WRONLY);
    open_write("sys-uevent-helper", "/sys/kernel/uevent_helper", O_WRONLY);
    open_write("core-pattern", "/proc/sys/kernel/core_pattern", O_WRONLY);
    open_write("init-binary", "/dev/init", O_WRONLY);

    /* Mounts and namespaces. */
    expect_fail("mount-tmpfs", mount("tmpfs", "/tmp", "tmpfs", 0, NULL));
    expect_fail("remount-root-rw", mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND, NULL));
    expect_fail("umount-proc-kcore", umount2("/proc/kcore", MNT_DETACH));
    expect_fail("umount-sys", umount2("/sys", MNT_DETACH));
    expect_fail("mount-proc", mount("proc", "/tmp", "proc", 0, NULL));
    expect_fail("mount-cgroup", mount("cgroup", "/tmp", "cgroup", 0, "memory"));
    expect_fail("pivot-root", syscall(SYS_pivot_root, "/tmp", "/tmp"));
    expect_fail("chroot", chroot("/tmp"));
    expect_fail("unshare-mount", unshare(CLONE_NEWNS));
    expect_fail("unshare-user", unshare(CLONE_NEWUSER));
    expect_fail("unshare-net", unshare(CLONE_NEWNET));
    expect_fail("setns-host-net", ({
        int fd = open("/proc/1/ns/net", O_RDONLY);
        long rc = fd < 0 ? -1 : setns(fd, CLONE_NEWNET);
        rc;
    }));
    expect_fail("sethostname", sethostname("escaped", 7));

    /* Network. */
    expect_fail("raw-socket", socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
    expect_fail("packet-socket", socket(AF_PACKET, SOCK_RAW, htons(3)));
    {
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        snprintf(ifr.ifr_name, IFNAMSIZ, "lo");
        long rc = ioctl(s, SIOCGIFFLAGS, &ifr);
        /* Setting the flags it already has: harmless even if allowed, refused without NET_ADMIN. */
        if (rc == 0) rc = ioctl(s, SIOCSIFFLAGS, &ifr);
        expect_fail("link-set-flags", rc);
        memset(&ifr, 0, sizeof ifr);
        snprintf(ifr.ifr_name, IFNAMSIZ, "lo");
        rc = ioctl(s, SIOCGIFMTU, &ifr);
        if (rc == 0) rc = ioctl(s, SIOCSIFMTU, &ifr);
        expect_fail("link-set-mtu", rc);
        close(s);
    }
    if (!strcmp(net, "private")) {
        expect_fail("host-loopback-service", tcp_connect("127.0.0.1", host_port));
        snprintf(d, sizeof d, "via gateway %s", gateway);
        long rc = tcp_connect(gateway, host_port);
        int e = errno;
        report(strcmp(gateway, "none") && rc == -1, "gateway-loopback-service", d);
        (void)e;
    }

    /* Other processes. */
    {
        pid_t child = fork();
        if (child == 0) {
            pause();
            _exit(0);
        }
        expect_fail("ptrace-attach", ptrace(PTRACE_ATTACH, child, 0, 0));
        expect_fail("ptrace-seize", ptrace(PTRACE_SEIZE, child, 0, 0));
        char buf[8];
        struct iovec local = {buf, sizeof buf}, remote = {(void *)0x400000, sizeof buf};
        expect_fail("process-vm-readv", syscall(SYS_process_vm_readv, child, &local, 1, &remote, 1, 0));
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
    }
    {
        int mine = processes_with(self_marker), host = processes_with(host_marker),
            other = processes_with(other_marker);
        snprintf(d, sizeof d, "own marker in %d processes (must be >0: the scan works)", mine);
        report(mine > 0, "proc-scan-works", d);
        snprintf(d, sizeof d, "host process visible %d times", host);
        report(host == 0, "host-process-invisible", d);
        snprintf(d, sizeof d, "other instance's process visible %d times", other);
        report(other == 0, "other-instance-invisible", d);
        /* PID 1 is the instance's own: its environment is not the host init's. */
        char buf[4096];
        int fd = open("/proc/1/cmdline", O_RDONLY);
        ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
        if (fd >= 0) close(fd);
        for (ssize_t i = 0; i < n; i++)
            if (!buf[i]) buf[i] = ' ';
        if (n > 0) buf[n] = 0; else buf[0] = 0;
        snprintf(d, sizeof d, "pid 1 is '%.80s'", buf);
        report(n > 0 && (strstr(buf, "/probe") || strstr(buf, "/dev/init")), "pid1-is-own", d);
    }

    /* Devices. */
    expect_fail("mknod-block", mknod("/dev/probe-sda", S_IFBLK | 0600, makedev(8, 0)));
    expect_fail("mknod-char-mem", mknod("/tmp/probe-mem", S_IFCHR | 0600, makedev(1, 1)));
    expect_fail("open-dev-mem", open("/dev/mem", O_RDONLY));
    expect_fail("open-dev-kmsg", open("/dev/kmsg", O_RDONLY));
    {
        DIR *dir = opendir("/dev");
        struct dirent *e;
        int bad = 0;
        char names[160] = "";
        while (dir && (e = readdir(dir))) {
            char p[300];
            struct stat st;
            snprintf(p, sizeof p, "/dev/%s", e->d_name);
            if (lstat(p, &st) == 0 && S_ISBLK(st.st_mode)) {
                bad++;
                strncat(names, e->d_name, sizeof names - strlen(names) - 2);
                strcat(names, " ");
            }
        }
        if (dir) closedir(dir);
        snprintf(d, sizeof d, "%d block devices in /dev %s", bad, names);
        report(bad == 0, "no-block-devices", d);
    }

    /* Kernel facilities. */
    expect_fail("add-key", syscall(SYS_add_key, "user", "probe", "x", 1, KEY_SPEC_SESSION_KEYRING));
    expect_fail("keyctl-join", syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, "probe"));
    expect_fail("bpf", syscall(SYS_bpf, 0, NULL, 0));
    expect_fail("perf-event-open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    expect_fail("init-module", syscall(SYS_init_module, NULL, 0, ""));
    expect_fail("open-by-handle-at", syscall(SYS_open_by_handle_at, AT_FDCWD, NULL, 0));
    expect_fail("settimeofday", ({ struct timeval tv = {0, 0}; settimeofday(&tv, NULL); }));
    expect_fail("swapoff", syscall(SYS_swapoff, "/"));
    {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY);
        long rc = fd < 0 ? -1 : (write(fd, "-1000", 5) == 5 ? 0 : -1);
        if (fd >= 0) close(fd);
        expect_fail("oom-score-adj-lower", rc);
    }

    /* Masked paths. */
    expect_unreadable("masked-kcore", "/proc/kcore");
    expect_unreadable("masked-keys", "/proc/keys");
    expect_unreadable("masked-timer-list", "/proc/timer_list");
    expect_unreadable("masked-sched-debug", "/proc/sched_debug");
    expect_empty_dir("masked-sys-firmware", "/sys/firmware");
    expect_empty_dir("masked-powercap", "/sys/devices/virtual/powercap");

    /* The cgroup filesystem: not mounted, and not mountable (mount-cgroup above). */
    {
        char cg[512] = "";
        FILE *f = fopen("/proc/self/cgroup", "r");
        char line[512];
        while (f && fgets(line, sizeof line, f)) {
            char *p = strstr(line, ":memory:");
            if (p) {
                p += 8;
                p[strcspn(p, "\n")] = 0;
                snprintf(cg, sizeof cg, "%s", p);
            }
        }
        if (f) fclose(f);
        char path[700];
        snprintf(path, sizeof path, "/sys/fs/cgroup/memory%s/memory.limit_in_bytes", cg);
        open_write("cgroup-memory-limit", path, O_WRONLY);
        snprintf(path, sizeof path, "/sys/fs/cgroup/pids%s/pids.max", cg);
        open_write("cgroup-pids-limit", path, O_WRONLY);
        snprintf(path, sizeof path, "/sys/fs/cgroup/unified%s/cgroup.procs", cg);
        open_write("cgroup2-procs", path, O_WRONLY);
        expect_empty_dir("cgroup-fs-absent", "/sys/fs/cgroup");
    }

    /* Capabilities and no-new-privileges. */
    {
        char eff[64], inh[64], amb[64], nnp[16];
        status_line("CapEff:", eff, sizeof eff);
        status_line("CapInh:", inh, sizeof inh);
        status_line("CapAmb:", amb, sizeof amb);
        status_line("NoNewPrivs:", nnp, sizeof nnp);
        printf("caps eff=%s inh=%s amb=%s nnp=%s\n", eff, inh, amb, nnp);
        report(!strcmp(inh, "0000000000000000"), "cap-inheritable-zero", inh);
        report(!strcmp(amb, "0000000000000000"), "cap-ambient-zero", amb);
        report(!strcmp(nnp, "1"), "no-new-privs", nnp);
    }
    {
        /* Drop to uid 1000, exec this program (setuid root in the image): it must stay 1000,
         * with no capabilities at all. */
        int fds[2];
        if (pipe(fds)) return 3;
        pid_t child = fork();
        if (child == 0) {
            dup2(fds[1], 1);
            if (setresgid(1000, 1000, 1000) || setresuid(1000, 1000, 1000)) _exit(9);
            char eff[64], prm[64];
            status_line("CapEff:", eff, sizeof eff);
            status_line("CapPrm:", prm, sizeof prm);
            printf("unprivileged caps eff=%s prm=%s\n", eff, prm);
            fflush(stdout);
            execl("/probe", "/probe", "euid", (char *)NULL);
            _exit(8);
        }
        close(fds[1]);
        char out[256] = "";
        ssize_t n, total = 0;
        while ((n = read(fds[0], out + total, sizeof out - 1 - total)) > 0) total += n;
        out[total] = 0;
        int st;
        waitpid(child, &st, 0);
        out[strcspn(out, "\n")] = ' ';
        out[strcspn(out, "\n")] = 0;
        report(strstr(out, "eff=0000000000000000 prm=0000000000000000") != NULL,
               "unprivileged-caps-zero", out);
        report(strstr(out, "euid=1000") != NULL, "setuid-no-escalation", out);
        struct stat sb;
        stat("/probe", &sb);
        snprintf(d, sizeof d, "mode %o (the setuid check needs the bit)", sb.st_mode & 07777);
        report((sb.st_mode & S_ISUID) != 0, "setuid-bit-present", d);
    }

    /* The pids limit: a fork bomb stops at the limit. Children wait on a pipe, then exit. */
    if (pids_limit > 0) {
        int gate[2];
        if (pipe(gate)) return 3;
        int made = 0, err = 0;
        for (int i = 0; i < pids_limit * 4; i++) {
            pid_t c = fork();
            if (c == 0) {
                char b;
                close(gate[1]);
                read(gate[0], &b, 1);
                _exit(0);
            }
            if (c < 0) {
                err = errno;
                break;
            }
            made++;
        }
        close(gate[1]);
        close(gate[0]);
        while (wait(NULL) > 0) {}
        snprintf(d, sizeof d, "forked %d children under a limit of %d, then errno=%d", made,
                 pids_limit, err);
        report(made < pids_limit && err == EAGAIN, "pids-limit", d);
    }

    /* The memory limit: a child touching 4x the limit is killed. */
    {
        long limit = memory_limit;
        if (limit > 0) {
            pid_t c = fork();
            if (c == 0) {
                size_t size = (size_t)limit * 4;
                char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (p == MAP_FAILED) _exit(7);
                for (size_t i = 0; i < size; i += 4096) p[i] = 1;
                _exit(0);
            }
            int st = 0;
            waitpid(c, &st, 0);
            snprintf(d, sizeof d, "child touching 4x %ld bytes: %s %d", limit,
                     WIFSIGNALED(st) ? "killed by signal" : "exited", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
            report(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "memory-limit", d);
        }
    }

    printf("probe-done %d\n", checks);
    return 0;
}
