/*
 * fsys-master, compiled: the front door of `fsys-master`, built by `pip install .`
 * (setup.py) when a C compiler is there.
 *
 * A command of a kept session that listens (`fsys-master run --view --keep S ...
 * -- PROGRAM ARGS`, fsys/master/keeping.py) is served from here, without starting
 * Python: the Python client that last ran the same options and program left a quick
 * record of them (keeping.remember), and this program finds it, checks it, sends the
 * request and its standard input, output and error to the session, passes on the
 * signals it gets and exits with the program's status. Everything else -- another
 * command, no record, a record that no longer holds, no session listening, a session
 * ending -- is handed to fsys.master in Python (exec: the same process, the same
 * arguments), which decides and reports. Nothing is sent before the hand-over is
 * ruled out, so a command never runs twice.
 *
 * FSYS_MASTER_PYTHON names the Python to hand over to, by its absolute path
 * (default: the python3 of the virtual environment this program is in, else the
 * one it was built with).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <locale.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <fcntl.h>

#ifndef FSYS_PYTHON
#error "build with -DFSYS_PYTHON='\"/path/to/python\"' (setup.py does)"
#endif
#ifndef FSYS_VERSION
#error "build with -DFSYS_VERSION='\"x.y.z\"' (setup.py does)"
#endif

extern char **environ;

/* fsys.master.keeping: QUICK_MAGIC, REQUEST_MAGIC, RETRY, SESSION_FAILED. */
#define QUICK_MAGIC "fsys-quick-1"
#define REQUEST_MAGIC "fsk1"
#define RETRY (-1)
#define SESSION_FAILED 125
#define MAX_RECORD (1 << 16)

/* The signals passed on to the program (keeping.RELAYED), and SIGTSTP. */
static const int relayed[] = {SIGINT, SIGQUIT, SIGTERM, SIGHUP, SIGWINCH,
                              SIGUSR1, SIGUSR2, SIGCONT};
#define NRELAYED (sizeof relayed / sizeof relayed[0])

/* The Python that fsys is installed in: FSYS_MASTER_PYTHON; else, when this program
 * is in a virtual environment's bin/ (pyvenv.cfg above it), that environment's
 * python3 (a wheel built elsewhere was installed there); else the one this was built
 * with. */
static const char *python(void)
{
    static char found[PATH_MAX];
    const char *given = getenv("FSYS_MASTER_PYTHON");
    if (given && *given)
        return given;
    if (!found[0]) {
        char exe[PATH_MAX], cfg[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        exe[n > 0 ? n : 0] = '\0';
        char *bin = strrchr(exe, '/');
        if (bin)
            *bin = '\0'; /* exe is now its directory */
        char *top = strrchr(exe, '/');
        int venv = bin && top && snprintf(cfg, sizeof cfg, "%.*s/pyvenv.cfg",
                                          (int)(top - exe), exe) < (int)sizeof cfg &&
                   access(cfg, R_OK) == 0;
        if (!venv || snprintf(found, sizeof found, "%s/python3", exe) >= (int)sizeof found ||
            access(found, X_OK) != 0)
            snprintf(found, sizeof found, "%s", FSYS_PYTHON);
    }
    return found;
}

/* fsys.master in Python, with our arguments: it decides everything we do not. */
static void __attribute__((noreturn)) hand_over(int argc, char **argv)
{
    char **args = calloc((size_t)argc + 4, sizeof *args);
    if (!args) {
        perror("fsys-master");
        exit(SESSION_FAILED);
    }
    args[0] = (char *)python();
    args[1] = "-P"; /* not the working directory's modules on the path */
    args[2] = "-m";
    args[3] = "fsys.master";
    for (int i = 1; i < argc; i++)
        args[i + 3] = argv[i];
    execv(args[0], args);
    fprintf(stderr, "fsys-master: cannot start %s: %s (FSYS_MASTER_PYTHON names the "
                    "Python fsys is installed in)\n", args[0], strerror(errno));
    exit(SESSION_FAILED);
}

/* --- a growing buffer ------------------------------------------------------------- */

struct buf {
    char *data;
    size_t len, cap;
};

static int put(struct buf *b, const void *data, size_t len)
{
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown)
            return -1;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

static int put_name(struct buf *b, const char *name)
{
    return put(b, name, strlen(name) + 1); /* with its NUL */
}

static int put_u32(struct buf *b, uint32_t v)
{
    unsigned char be[4] = {v >> 24, v >> 16, v >> 8, v};
    return put(b, be, 4);
}

static int put_i64(struct buf *b, int64_t v)
{
    uint64_t u = (uint64_t)v;
    unsigned char be[8];
    for (int i = 0; i < 8; i++)
        be[i] = (unsigned char)(u >> (56 - 8 * i));
    return put(b, be, 8);
}

/* --- the program, found as fsys.master.finding.resolve_program finds it ------------- */

/* posixpath.normpath of an absolute path, in place (Python keeps exactly two leading
 * slashes: so do we). */
static void normalize(char *path)
{
    size_t keep = (path[1] == '/' && path[2] != '/') ? 2 : 1;
    char *out = path + keep, *in = path;
    size_t depth = 0;
    while (*in) {
        while (*in == '/')
            in++;
        char *end = in;
        while (*end && *end != '/')
            end++;
        size_t n = (size_t)(end - in);
        if (n == 0 || (n == 1 && in[0] == '.')) {
            /* nothing */
        } else if (n == 2 && in[0] == '.' && in[1] == '.') {
            if (depth) { /* the last component goes, and the slash before it */
                while (out > path + keep && out[-1] != '/')
                    out--;
                if (out > path + keep)
                    out--;
                depth--;
            }
        } else {
            if (depth)
                *out++ = '/';
            memmove(out, in, n);
            out += n;
            depth++;
        }
        in = end;
    }
    if (depth == 0)
        out = path + keep;
    *out = '\0';
}

/* os.path.abspath(name) into out; 0 if it does not fit or there is no working dir. */
static int absolute(const char *name, char *out)
{
    if (name[0] == '/') {
        if (strlen(name) >= PATH_MAX)
            return 0;
        strcpy(out, name);
    } else {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd))
            return 0;
        const char *slash = cwd[strlen(cwd) - 1] == '/' ? "" : "/"; /* os.path.join */
        if (snprintf(out, PATH_MAX, "%s%s%s", cwd, slash, name) >= PATH_MAX)
            return 0;
    }
    normalize(out);
    return 1;
}

static int is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* 1 and the program's path in out, or 0: not found, or not runnable (Python says). */
static int find_program(const char *name, char *out)
{
    if (strchr(name, '/')) {
        if (access(name, X_OK) != 0 || is_dir(name))
            return 0;
        return absolute(name, out);
    }
    const char *path = getenv("PATH");
    if (!path)
        path = "/bin:/usr/bin"; /* os.defpath */
    for (;;) {
        const char *colon = strchr(path, ':');
        size_t n = colon ? (size_t)(colon - path) : strlen(path);
        char candidate[PATH_MAX];
        const char *dir = n ? path : ".";
        int dirlen = n ? (int)n : 1;
        const char *slash = dir[dirlen - 1] == '/' ? "" : "/";
        if (snprintf(candidate, sizeof candidate, "%.*s%s%s", dirlen, dir, slash, name) <
                (int)sizeof candidate &&
            access(candidate, X_OK) == 0 && !is_dir(candidate))
            return absolute(candidate, out);
        if (!colon)
            return 0;
        path = colon + 1;
    }
}

/* Python coerces a C locale (PEP 538): it adds LC_CTYPE=C.UTF-8 to its environment,
 * which the Python client then passes on. Such a command is Python's, so that the
 * program's environment does not depend on which client served it. */
static int coerces_locale(void)
{
    const char *all = getenv("LC_ALL"), *coerce = getenv("PYTHONCOERCECLOCALE");
    if ((all && *all) || (coerce && strcmp(coerce, "0") == 0))
        return 0;
    const char *ctype = setlocale(LC_CTYPE, "");
    int legacy = !ctype || strcmp(ctype, "C") == 0 || strcmp(ctype, "POSIX") == 0;
    setlocale(LC_CTYPE, "C");
    return legacy;
}

/* --- the kept sessions' directory (keeping.directory), and the record --------------- */

static int directory(char *out)
{
    const char *given = getenv("FSYS_KEEP_DIR");
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    int n;
    if (given && *given)
        n = snprintf(out, PATH_MAX, "%s", given);
    else if (runtime && *runtime)
        n = snprintf(out, PATH_MAX, "%s/fsys", runtime);
    else
        n = snprintf(out, PATH_MAX, "/tmp/fsys-%u", (unsigned)getuid());
    struct stat st;
    /* A name ending in / or /. is pathlib's to normalise (lstat would follow a link
     * there); and only a directory of ours that nobody else can enter (else Python
     * says why). */
    size_t len = n > 0 ? (size_t)n : 0;
    if (len == 0 || out[len - 1] == '/' || (out[len - 1] == '.' &&
                                            (len == 1 || out[len - 2] == '/')))
        return 0;
    return n < PATH_MAX && lstat(out, &st) == 0 && S_ISDIR(st.st_mode) &&
           st.st_uid == getuid() && !(st.st_mode & 077);
}

/* keeping.quick_name: FNV-1a, 64 bits. */
static uint64_t fnv1a(const char *data, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)data[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* The next NUL-terminated name of the record at *at, or NULL if there is none. */
static const char *take(const struct buf *record, size_t *at)
{
    if (*at >= record->len)
        return NULL;
    const char *name = record->data + *at;
    const char *nul = memchr(name, '\0', record->len - *at);
    if (!nul)
        return NULL;
    *at = (size_t)(nul - record->data) + 1;
    return name;
}

/* The session's socket from the record of `inputs` into `sock_path`, if the record
 * holds: it repeats the inputs, the program is still the same file, the --config
 * file is unchanged. */
static int look_up(const char *dir, const struct buf *inputs, const char *program,
                   char *sock_path)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/%016llx.quick", dir,
                 (unsigned long long)fnv1a(inputs->data, inputs->len)) >= (int)sizeof path)
        return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return 0;
    struct buf record = {0};
    char chunk[4096];
    ssize_t got;
    while ((got = read(fd, chunk, sizeof chunk)) > 0 && record.len < MAX_RECORD)
        if (put(&record, chunk, (size_t)got) != 0)
            break;
    close(fd);
    int ok = 0;
    size_t at = inputs->len;
    if (got == 0 && record.len > inputs->len &&
        memcmp(record.data, inputs->data, inputs->len) == 0) {
        const char *sock = take(&record, &at), *real = take(&record, &at);
        const char *config = take(&record, &at), *identity = take(&record, &at);
        char now[PATH_MAX];
        ok = sock && identity && at == record.len && strlen(sock) < sizeof(
            ((struct sockaddr_un *)0)->sun_path) && realpath(program, now) &&
            strcmp(now, real) == 0;
        if (ok && *config) {
            struct stat st;
            char seen[128];
            ok = stat(config, &st) == 0;
            if (ok) {
                snprintf(seen, sizeof seen, "%llu:%llu:%lld:%lld",
                         (unsigned long long)st.st_dev, (unsigned long long)st.st_ino,
                         (long long)st.st_size,
                         (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
                ok = strcmp(seen, identity) == 0;
            }
        }
        if (ok)
            strcpy(sock_path, sock);
    }
    free(record.data);
    return ok;
}

/* --- the conversation (keeping._converse) ------------------------------------------- */

static int session = -1;

static void relay(int signum)
{
    int saved = errno;
    unsigned char be[4] = {(unsigned)signum >> 24, (unsigned)signum >> 16,
                           (unsigned)signum >> 8, (unsigned)signum};
    ssize_t ignored = send(session, be, sizeof be, MSG_NOSIGNAL);
    (void)ignored;
    errno = saved;
}

/* Ctrl-Z: the program's group stops, then we do, as the shell expects; at fg,
 * SIGCONT reaches us and is passed on. */
static void stop(int signum)
{
    (void)signum;
    relay(SIGTSTP);
    kill(getpid(), SIGSTOP);
}

/* The dispositions we were given, put back before a hand-over (nohup's SIGHUP...). */
static struct sigaction given[NRELAYED + 1];

/* relay() for the signals passed on, stop() for SIGTSTP (one at a time, in the order
 * they came); or, with NULL, the dispositions we were given. */
static void handle(void (*handler)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigfillset(&sa.sa_mask);
    for (size_t i = 0; i <= NRELAYED; i++) {
        int signum = i < NRELAYED ? relayed[i] : SIGTSTP;
        sa.sa_handler = i < NRELAYED ? handler : stop;
        if (handler)
            sigaction(signum, &sa, &given[i]);
        else
            sigaction(signum, &given[i], NULL);
    }
}

/* Whether the environment entry at e is one to send: a NAME=VALUE whose NAME no
 * entry before it has (as os.environ keeps the first). */
static int first_of_its_name(char **e)
{
    const char *equals = strchr(*e, '=');
    if (!equals)
        return 0;
    size_t n = (size_t)(equals - *e) + 1;
    for (char **before = environ; before < e; before++)
        if (strncmp(*before, *e, n) == 0)
            return 0;
    return 1;
}

/* The request (keeping.Request's encoding), after its 4-byte length. */
static int request(struct buf *b, const char *program, char **argv, int argc)
{
    char *cwd = getcwd(NULL, 0);
    if (!cwd)
        return -1; /* removed: Python says so */
    mode_t umask_ = umask(0);
    umask(umask_);
    struct rlimit nofile;
    getrlimit(RLIMIT_NOFILE, &nofile);
    uint32_t envc = 0;
    for (char **e = environ; *e; e++)
        if (first_of_its_name(e))
            envc++;
    int fail = put_u32(b, 0) || put(b, REQUEST_MAGIC, 4) || put_u32(b, umask_) ||
               put_i64(b, (int64_t)nofile.rlim_cur) || put_i64(b, (int64_t)nofile.rlim_max) ||
               put_u32(b, (uint32_t)argc) || put_u32(b, envc) || put_name(b, program) ||
               put_name(b, cwd);
    free(cwd);
    for (int i = 0; !fail && i < argc; i++)
        fail = put_name(b, argv[i]);
    for (char **e = environ; !fail && *e; e++)
        if (first_of_its_name(e))
            fail = put_name(b, *e);
    if (fail)
        return -1;
    uint32_t len = (uint32_t)(b->len - 4);
    unsigned char be[4] = {len >> 24, len >> 16, len >> 8, len};
    memcpy(b->data, be, 4);
    return 0;
}

/* Our standard input, output and error (/dev/null where one is closed). */
static void stdio(int fds[3])
{
    for (int fd = 0; fd < 3; fd++) {
        struct stat st;
        fds[fd] = fstat(fd, &st) == 0 ? fd : open("/dev/null", O_RDWR | O_CLOEXEC);
    }
}

static int send_request(const struct buf *b)
{
    int fds[3];
    stdio(fds);
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {b->data, b->len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    ssize_t sent = sendmsg(session, &msg, MSG_NOSIGNAL);
    if (sent < 0)
        return -1;
    for (size_t at = (size_t)sent; at < b->len; at += (size_t)sent) {
        sent = send(session, b->data + at, b->len - at, MSG_NOSIGNAL);
        if (sent <= 0)
            return -1;
    }
    return 0;
}

/* The program's exit status; RETRY if the session was ending (the program did not
 * run); SESSION_FAILED and a message if the session ended before the program did. */
static int converse(const struct buf *b, const char *sock_path)
{
    if (send_request(b) != 0)
        return RETRY; /* the session went as we connected: nothing ran */
    handle(relay);
    unsigned char be[4];
    size_t got = 0;
    while (got < sizeof be) {
        ssize_t n = read(session, be + got, sizeof be - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            handle(NULL);
            size_t len = strlen(sock_path);
            fprintf(stderr, "fsys-master: the kept session ended before the program did "
                            "(its log: %.*s.log)\n", (int)(len > 5 ? len - 5 : len), sock_path);
            return SESSION_FAILED;
        }
        got += (size_t)n;
    }
    handle(NULL);
    return (int32_t)((uint32_t)be[0] << 24 | (uint32_t)be[1] << 16 | (uint32_t)be[2] << 8 | be[3]);
}

/* The program's status if the kept session served the command; -1 to hand it over. */
static int quick(int argc, char **argv)
{
    if (argc < 4 || strcmp(argv[1], "run") != 0)
        return -1;
    int dash = 0;
    for (int i = 2; i < argc && !dash; i++)
        if (strcmp(argv[i], "--") == 0)
            dash = i;
    char program[PATH_MAX], dir[PATH_MAX], sock_path[PATH_MAX];
    if (!dash || dash + 1 >= argc || coerces_locale() || !find_program(argv[dash + 1], program) ||
        !directory(dir))
        return -1;
    struct buf inputs = {0};
    int fail = put_name(&inputs, QUICK_MAGIC) || put_name(&inputs, FSYS_VERSION) ||
               put_name(&inputs, python());
    for (int i = 2; !fail && i < dash; i++)
        fail = put_name(&inputs, argv[i]);
    fail = fail || put_name(&inputs, "--") || put_name(&inputs, program);
    int found = !fail && look_up(dir, &inputs, program, sock_path);
    free(inputs.data);
    if (!found)
        return -1;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, sock_path);
    session = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (session >= 0 && session < 3) { /* a standard stream is closed: not it, or it is sent */
        int high = fcntl(session, F_DUPFD_CLOEXEC, 3);
        close(session);
        session = high;
    }
    if (session < 0 || connect(session, (struct sockaddr *)&addr, sizeof addr) != 0)
        return -1; /* none listens: Python starts one (and cleans up) */
    struct buf b = {0};
    int status = request(&b, program, argv + dash + 1, argc - dash - 1) == 0
                     ? converse(&b, sock_path) : RETRY;
    free(b.data);
    close(session);
    if (status == RETRY)
        return -1; /* the program did not run: Python asks again, or starts one */
    return status & 0xff; /* as Python's sys.exit(status) */
}

int main(int argc, char **argv)
{
    const char *given = getenv("FSYS_MASTER_PYTHON");
    if (given && *given && given[0] != '/') {
        fprintf(stderr, "fsys-master: FSYS_MASTER_PYTHON must be an absolute path, not "
                        "%s\n", given);
        return SESSION_FAILED;
    }
    int status = quick(argc, argv);
    if (status < 0)
        hand_over(argc, argv);
    return status;
}
