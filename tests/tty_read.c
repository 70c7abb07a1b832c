/* A read(2) from standard input interrupted by SIGINT, with or without SA_RESTART
 * (argv[1]: "restart" or "eintr"): prints what the handler and the read saw. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void on_signal(int signum) {
    static const char said[] = "handler ran\n";
    (void)signum;
    write(1, said, sizeof said - 1);
}

int main(int argc, char **argv) {
    struct sigaction action;
    char buf[64];
    ssize_t n;

    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    action.sa_flags = argc > 1 && strcmp(argv[1], "restart") == 0 ? SA_RESTART : 0;
    sigaction(SIGINT, &action, NULL);
    printf("ready\n");
    fflush(stdout);
    n = read(0, buf, sizeof buf);
    if (n < 0)
        printf("read failed: %s\n", strerror(errno));
    else
        printf("read %zd bytes: %.*s|\n", n, (int)n, buf);
    return 0;
}
