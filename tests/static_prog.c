/* A statically linked program for the end-to-end tests: no loader, no shared libc.
 * static_prog DIR: creates DIR/static.txt, reads it back, stats it, lists DIR. */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char path[4096], buf[64];
    if (argc != 2) return 2;
    snprintf(path, sizeof path, "%s/static.txt", argv[1]);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror("open"); return 1; }
    if (write(fd, "static hello\n", 13) != 13) { perror("write"); return 1; }
    close(fd);
    fd = open(path, O_RDONLY);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n < 0) { perror("read"); return 1; }
    buf[n] = 0;
    close(fd);
    struct stat st;
    if (stat(path, &st) != 0) { perror("stat"); return 1; }
    printf("read: %s", buf);
    printf("size: %lld\n", (long long)st.st_size);
    DIR *d = opendir(argv[1]);
    if (!d) { perror("opendir"); return 1; }
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.') printf("entry: %s\n", e->d_name);
    closedir(d);
    return 0;
}
