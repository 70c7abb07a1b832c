/* A trapped call that stays on the master, in a loop: prints microseconds per call.
 *
 *     trapped read  COUNT        read(fd, buf, 1) from a pipe of this process
 *     trapped fstat PATH COUNT   fstat(2) of an open file (a master path, e.g. /usr/...)
 *
 * Both are trapped by fsys's filter (disposition fd) and continued by fmhub, because
 * the fd is not a placeholder. Only the loop is timed (CLOCK_MONOTONIC, in the vDSO,
 * so not trapped): neither the session's start nor, for read, the writes that refill
 * the pipe between two timed stretches. fstat is issued as the fstat system call
 * itself: glibc >= 2.33's fstat() is newfstatat(fd, "", AT_EMPTY_PATH), another row.
 * bench/run.py builds and runs it.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double elapsed_ns(const struct timespec *a, const struct timespec *b) {
    return (b->tv_sec - a->tv_sec) * 1e9 + (b->tv_nsec - a->tv_nsec);
}

static int loop_read(long n) {
    int p[2];
    if (pipe(p) != 0) {
        perror("pipe");
        return 1;
    }
    int size = fcntl(p[1], F_GETPIPE_SZ);
    if (size <= 0)
        size = 4096;
    char *fill = malloc(size);
    if (fill == NULL)
        return 1;
    memset(fill, 'x', size);
    double ns = 0;
    char c;
    for (long done = 0; done < n;) {
        long stretch = n - done < size ? n - done : size;
        for (long off = 0; off < stretch;) {  /* refill, untimed */
            ssize_t w = write(p[1], fill, stretch - off);
            if (w <= 0) {
                perror("write");
                return 1;
            }
            off += w;
        }
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < stretch; i++)
            if (read(p[0], &c, 1) != 1) {
                perror("read");
                return 1;
            }
        clock_gettime(CLOCK_MONOTONIC, &b);
        ns += elapsed_ns(&a, &b);
        done += stretch;
    }
    printf("%.3f\n", ns / 1e3 / n);
    return 0;
}

static int loop_fstat(const char *path, long n) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        perror(path);
        return 1;
    }
    struct stat st;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        if (syscall(SYS_fstat, fd, &st) != 0) {
            perror("fstat");
            return 1;
        }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.3f\n", elapsed_ns(&a, &b) / 1e3 / n);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "read") == 0)
        return loop_read(atol(argv[2]));
    if (argc == 4 && strcmp(argv[1], "fstat") == 0)
        return loop_fstat(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: trapped read COUNT | trapped fstat PATH COUNT\n");
    return 2;
}
