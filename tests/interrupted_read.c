/* A read(2) interrupted by a signal, with or without SA_RESTART (argv[1]: "restart"
 * or "eintr"): prints what the handler and the read saw.
 *   interrupted_read HOW        reads standard input; the terminal's SIGINT comes
 *   interrupted_read HOW FIFO   reads FIFO (opened O_RDWR: no wait at the open);
 *                               SIGALRM comes 0.3 s later (under fsys the FIFO is the
 *                               slave's, and the read a forwarded call) */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static void on_signal(int signum) {
    static const char said[] = "handler ran\n";
    (void)signum;
    write(1, said, sizeof said - 1);
}

int main(int argc, char **argv) {
    struct sigaction action;
    struct itimerval timer;
    char buf[64];
    ssize_t n;
    int fd = 0;
    int signum = SIGINT;

    if (argc > 2) {
        fd = open(argv[2], O_RDWR);
        if (fd < 0) {
            printf("open failed: %s\n", strerror(errno));
            return 1;
        }
        signum = SIGALRM;
    }
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    action.sa_flags = argc > 1 && strcmp(argv[1], "restart") == 0 ? SA_RESTART : 0;
    sigaction(signum, &action, NULL);
    if (signum == SIGALRM) {
        memset(&timer, 0, sizeof timer);
        timer.it_value.tv_usec = 300000;
        setitimer(ITIMER_REAL, &timer, NULL);
    }
    printf("ready\n");
    fflush(stdout);
    n = read(fd, buf, sizeof buf);
    if (n < 0)
        printf("read failed: %s\n", strerror(errno));
    else
        printf("read %zd bytes: %.*s|\n", n, (int)n, buf);
    return 0;
}
