/* stat(2) in a loop: prints microseconds per call. bench/run.py builds and runs it. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: statloop PATH COUNT\n");
        return 2;
    }
    long n = atol(argv[2]);
    struct stat st;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        if (stat(argv[1], &st) != 0) {
            perror("stat");
            return 1;
        }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / n;
    printf("%.3f\n", us);
    return 0;
}
