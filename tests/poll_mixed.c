/* poll(2) on a local pipe and a socket together: connects to 127.0.0.1:PORT
 * (argv[1]), then waits on both. The child writes "pipe" into the pipe after
 * 100 ms; the server sends "sock" later. Prints each fd as poll reports it. */
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int fds[2];
    if (argc < 2 || pipe(fds) < 0) return 2;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
    if (connect(s, (struct sockaddr *)&sin, sizeof sin) < 0) { perror("connect"); return 3; }
    if (fork() == 0) { usleep(100000); write(fds[1], "pipe", 4); _exit(0); }
    struct pollfd p[2] = {{.fd = fds[0], .events = POLLIN}, {.fd = s, .events = POLLIN}};
    int seen = 0;
    char buf[64];
    while (seen != 3) {
        if (poll(p, 2, 5000) <= 0) { printf("timeout\n"); return 4; }
        for (int i = 0; i < 2; i++) {
            if (!(p[i].revents & POLLIN)) continue;
            ssize_t n = read(p[i].fd, buf, sizeof buf - 1);
            if (n <= 0) { printf("eof on %d\n", i); return 5; }
            buf[n] = 0;
            printf("%s: %s\n", i ? "socket" : "pipe", buf);
            seen |= 1 << i;
            p[i].events = 0;
            if (i == 0) write(s, "go", 2); /* the server answers once the pipe spoke */
        }
    }
    wait(NULL);
    return 0;
}
