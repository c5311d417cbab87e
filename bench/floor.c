/* The physical reference of a postcopy push on this machine, in plain C.
 *
 *   floor recv PORT NBYTES CHUNK MODE   MODE: install (recv into a cache-hot staging
 *                                       buffer, UFFDIO_COPY per CHUNK into
 *                                       userfaultfd-registered memory), hugetlb (the
 *                                       same into 2 MiB hugetlbfs pages; CHUNK a
 *                                       multiple of 2 MiB) or recv (no install: the
 *                                       loopback TCP ceiling)
 *   floor send PORT NBYTES CHUNK        connects to 127.0.0.1:PORT and writes NBYTES
 *                                       from one CHUNK-byte buffer
 *
 * The receiver prints one JSON object: wall time, time inside recv and inside
 * UFFDIO_COPY, its CPU seconds (user, system).  No framing, no bitmap, no Python:
 * what the kernel allows, the ceiling migrated's bulk path is measured against.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int open_uffd(void) {
    int fd = -1;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, _IO(0xAA, 0x00), O_CLOEXEC);
        close(dev);
    }
    if (fd < 0) fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
    if (fd < 0) die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(fd, UFFDIO_API, &api) < 0) die("UFFDIO_API");
    return fd;
}

static int do_recv(int port, size_t nbytes, size_t chunk, int install, int huge) {
    int srv = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(srv, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(srv, 1) < 0) die("listen");
    printf("listening\n");
    fflush(stdout);
    int s = accept(srv, NULL, NULL);
    if (s < 0) die("accept");
    uint8_t *mem = NULL;
    int uffd = -1;
    if (install) {
        int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (huge ? MAP_HUGETLB : 0);
        mem = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, flags, -1, 0);
        if (mem == MAP_FAILED) die("mmap");
        if (!huge) madvise(mem, nbytes, MADV_NOHUGEPAGE);
        uffd = open_uffd();
        struct uffdio_register reg = {.range = {(uint64_t)(uintptr_t)mem, nbytes},
                                      .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) die("UFFDIO_REGISTER");
    }
    uint8_t *staging = aligned_alloc(4096, chunk);
    memset(staging, 0, chunk); /* cache-hot, backed */
    double t0 = now(), recv_s = 0, copy_s = 0;
    size_t got = 0;
    while (got < nbytes) {
        size_t want = nbytes - got < chunk ? nbytes - got : chunk;
        double t = now();
        ssize_t n = recv(s, staging, want, MSG_WAITALL);
        recv_s += now() - t;
        if (n <= 0) {
            if (n < 0) die("recv");
            break;
        }
        if (install) {
            t = now();
            struct uffdio_copy c = {.dst = (uint64_t)(uintptr_t)(mem + got),
                                    .src = (uint64_t)(uintptr_t)staging,
                                    .len = ((size_t)n + 4095) & ~(size_t)4095};
            if (ioctl(uffd, UFFDIO_COPY, &c) < 0) die("UFFDIO_COPY");
            copy_s += now() - t;
        }
        got += (size_t)n;
    }
    double wall = now() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"mode\": \"%s\", \"bytes\": %zu, \"chunk_bytes\": %zu, \"wall_s\": %.4f, "
           "\"GB_per_s\": %.3f, \"recv_s\": %.4f, \"install_s\": %.4f, \"user_s\": %.3f, "
           "\"sys_s\": %.3f}\n",
           huge ? "hugetlb" : install ? "install" : "recv", got, chunk, wall, got / wall / 1e9, recv_s, copy_s,
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
    return got == nbytes ? 0 : 1;
}

static int do_send(int port, size_t nbytes, size_t chunk) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    uint8_t *buf = aligned_alloc(4096, chunk);
    memset(buf, 0x5a, chunk);
    size_t sent = 0;
    while (sent < nbytes) {
        size_t want = nbytes - sent < chunk ? nbytes - sent : chunk;
        ssize_t n = send(s, buf, want, 0);
        if (n < 0) die("send");
        sent += (size_t)n;
    }
    shutdown(s, SHUT_WR);
    char c;
    while (recv(s, &c, 1, 0) > 0) {
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 5 && !strcmp(argv[1], "send"))
        return do_send(atoi(argv[2]), strtoull(argv[3], 0, 0), strtoull(argv[4], 0, 0));
    if (argc >= 6 && !strcmp(argv[1], "recv"))
        return do_recv(atoi(argv[2]), strtoull(argv[3], 0, 0), strtoull(argv[4], 0, 0),
                       strcmp(argv[5], "recv") != 0, !strcmp(argv[5], "hugetlb"));
    fprintf(stderr, "usage: floor recv PORT NBYTES CHUNK install|hugetlb|recv\n"
                    "       floor send PORT NBYTES CHUNK\n");
    return 2;
}
