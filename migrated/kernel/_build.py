"""cffi API-mode build of ``migrated.kernel._native``.

The compiler, not this file, computes every ioctl number and struct layout: the cdef
declares structs with ``...;`` and ioctl numbers as ``#define NAME ...`` so cffi reads
their values from ``<linux/kvm.h>`` and ``<linux/userfaultfd.h>`` at build time.

Where the installed headers are older than a feature we use (Debian 12 ships 6.1
headers, which lack KVM_PRE_FAULT_MEMORY), the definition from the KVM API
documentation is supplied under ``#ifndef``; support is probed at run time.

Unions inside kernel structs (``kvm_run``, ``uffd_msg``, ``kvm_dirty_log``) are not
declared to cffi; small C accessors flatten them instead.  The hot loops Python is
too slow for (zero-page scan, bitmap run-finding) are C helpers here too.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

_CSRC = Path(__file__).resolve().parent / "csrc"


def _read(name: str) -> str:
    return (_CSRC / name).read_text()


# Plain C declarations of the page loops, shared by the cdef and the compiler.
_PAGESTREAM_H = _read("pagestream.h")

# Flattened views of kernel unions, declared once for both cffi and the compiler.
SHARED = r"""
struct mig_io_exit {
    uint8_t direction;
    uint8_t size;
    uint16_t port;
    uint32_t count;
    uint64_t data_offset;
};
struct mig_uffd_event {
    uint8_t event;
    uint64_t address;
    uint64_t flags;
    uint32_t ptid;
    uint64_t start;
    uint64_t end;
};
"""

CDEF = (
    SHARED
    + _PAGESTREAM_H
    + r"""
/* ---- libc ---- */
int ioctl(int fd, unsigned long request, ...);
int open(const char *path, int flags, ...);
int close(int fd);
long syscall(long number, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int madvise(void *addr, size_t length, int advice);
int memfd_create(const char *name, unsigned int flags);
int ftruncate(int fd, long length);

#define O_RDWR ...
#define O_CLOEXEC ...
#define O_NONBLOCK ...
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_ANONYMOUS ...
#define MAP_NORESERVE ...
#define MAP_HUGETLB ...
#define MADV_DONTNEED ...
#define MADV_NOHUGEPAGE ...
#define MADV_HUGEPAGE ...
#define MFD_CLOEXEC ...
#define MFD_HUGETLB ...
#define SYS_userfaultfd ...

/* ---- KVM: system ioctls ---- */
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
/* ---- KVM: VM ioctls ---- */
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_ENABLE_CAP ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
/* ---- KVM: vCPU ioctls ---- */
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...

/* ---- KVM: capabilities ---- */
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_XSAVE2 ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_DEBUGREGS ...
#define KVM_CAP_PRE_FAULT_MEMORY ...
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_DIRTY_LOG_INITIALLY_SET ...

/* ---- KVM: exit reasons ---- */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    ...;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    ...;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    ...;
};

struct kvm_fpu { ...; };
struct kvm_xsave { ...; };
struct kvm_xcrs { ...; };
struct kvm_vcpu_events { ...; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_debugregs { ...; };

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    ...;
};

/* ---- userfaultfd ---- */
#define USERFAULTFD_IOC_NEW ...
#define UFFD_API ...
#define UFFDIO_API ...
#define UFFDIO_REGISTER ...
#define UFFDIO_UNREGISTER ...
#define UFFDIO_WAKE ...
#define UFFDIO_COPY ...
#define UFFDIO_ZEROPAGE ...
#define UFFDIO_REGISTER_MODE_MISSING ...
#define UFFDIO_REGISTER_MODE_WP ...
#define UFFDIO_COPY_MODE_DONTWAKE ...
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
#define _UFFDIO_REGISTER ...
#define _UFFDIO_UNREGISTER ...
#define _UFFDIO_WAKE ...
#define _UFFDIO_COPY ...
#define _UFFDIO_ZEROPAGE ...
#define _UFFDIO_API ...
#define UFFD_EVENT_PAGEFAULT ...
#define UFFD_EVENT_FORK ...
#define UFFD_EVENT_REMAP ...
#define UFFD_EVENT_REMOVE ...
#define UFFD_EVENT_UNMAP ...
#define UFFD_PAGEFAULT_FLAG_WRITE ...
#define UFFD_PAGEFAULT_FLAG_WP ...
#define UFFD_FEATURE_PAGEFAULT_FLAG_WP ...
#define UFFD_FEATURE_EVENT_FORK ...
#define UFFD_FEATURE_EVENT_REMAP ...
#define UFFD_FEATURE_EVENT_REMOVE ...
#define UFFD_FEATURE_EVENT_UNMAP ...
#define UFFD_FEATURE_MISSING_HUGETLBFS ...
#define UFFD_FEATURE_MISSING_SHMEM ...
#define UFFD_FEATURE_SIGBUS ...
#define UFFD_FEATURE_THREAD_ID ...
#define UFFD_FEATURE_MINOR_HUGETLBFS ...
#define UFFD_FEATURE_MINOR_SHMEM ...
#define UFFD_FEATURE_EXACT_ADDRESS ...

struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
struct uffdio_range { uint64_t start; uint64_t len; };
struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
struct uffdio_copy { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };

/* ---- flattening accessors and helpers (C source below) ---- */
void mig_run_io(struct kvm_run *run, struct mig_io_exit *out);
uint64_t mig_run_fail_entry_reason(struct kvm_run *run);
uint32_t mig_run_internal_suberror(struct kvm_run *run);
uint32_t mig_run_system_event_type(struct kvm_run *run);

size_t mig_sizeof_xsave(void);
size_t mig_sizeof_fpu(void);
size_t mig_sizeof_xcrs(void);
size_t mig_sizeof_vcpu_events(void);
size_t mig_sizeof_debugregs(void);

int mig_set_thread_name(const char *name);
int mig_set_supported_cpuid(int kvm_fd, int vcpu_fd);
int mig_get_msr_index_list(int kvm_fd, uint32_t *out, int max);
int mig_get_msrs(int vcpu_fd, const uint32_t *indices, uint64_t *values, int n);
int mig_set_msrs(int vcpu_fd, const uint32_t *indices, const uint64_t *values, int n);
int mig_get_dirty_log(int vm_fd, uint32_t slot, void *bitmap);
int mig_clear_dirty_log(int vm_fd, uint32_t slot, uint64_t first_page, uint32_t num_pages,
                        void *bitmap);
int mig_pre_fault_memory(int vcpu_fd, uint64_t *gpa, uint64_t *size);

int mig_uffd_read_events(int fd, struct mig_uffd_event *out, int max);

size_t mig_find_zero_pages(const uint8_t *base, size_t npages, size_t page_size,
                           uint8_t *bitmap_out, size_t first_bit);
int mig_page_is_zero(const uint8_t *page, size_t page_size);
int64_t mig_bitmap_find_run(const uint8_t *bitmap, size_t nbits, size_t start, int value,
                            size_t max_len, size_t *run_len);
size_t mig_bitmap_count(const uint8_t *bitmap, size_t nbits);
void mig_bitmap_set_range(uint8_t *bitmap, size_t start, size_t n, int value);
size_t mig_bitmap_or_count_new(uint8_t *dst, const uint8_t *src, size_t nbytes);
void mig_bitmap_andnot(uint8_t *dst, const uint8_t *src, size_t nbytes);
int64_t mig_discard_bitmap(uint8_t *base, size_t npages, size_t page_size,
                           const uint8_t *bitmap, size_t first_bit);
uint64_t mig_bitmap_claim(uint8_t *bm, uint64_t start, uint64_t n, uint64_t *runs,
                          uint32_t *nruns);

/* ---- page loops (csrc/pagestream.c) ---- */
#define MIG_RX_BATCH ...
#define MIG_RX_OTHER ...
#define MIG_RX_EOF ...
#define MIG_RX_IDLE ...
#define MIG_RX_INTERRUPTED ...
#define MIG_RX_TRUNCATED ...
#define MIG_RX_ERROR ...
#define MIG_RX_WANTED ...
#define MIG_RX_MAX_RUNS ...
#define MIG_TX_BATCH ...
#define MIG_TX_DONE ...
#define MIG_TX_IDLE ...
#define MIG_TX_INTERRUPTED ...
#define MIG_TX_ERROR ...
#define MIG_INSTALL_CHUNK ...

struct mig_rx {
    struct mig_rx_stats stats;
    int32_t err;
    uint32_t handback_len;
    uint64_t handback_payload;
    uint64_t handback_payload_addr;
    uint8_t handback[32];
    uint64_t *runs;
    uint32_t nruns;
    int wake_fd;
    int32_t interrupt;
    int state;
    uint32_t hdr_len;
    const uint8_t *wanted;
    ...;
};
struct mig_tx {
    struct mig_tx_stats stats;
    int32_t err;
    int wake_fd;
    int32_t interrupt;
    int64_t jump;
    int64_t cursor;
    uint32_t niov;
    ...;
};

int mig_install(const struct mig_pagemap *m, uint64_t page, uint64_t npages,
                const uint8_t *src, uint64_t *runs, struct mig_install_result *res);
int64_t mig_msgpack_extent(const uint8_t *p, size_t n, uint64_t max_pending);
size_t mig_encode_page_header(uint8_t *p, int zero, uint64_t gpa, uint64_t npages,
                              uint64_t request_id);
struct mig_rx *mig_rx_new(const struct mig_pagemap *map, int fd, uint8_t *staging,
                          uint64_t staging_nbytes, uint64_t max_frame_nbytes);
void mig_rx_free(struct mig_rx *rx);
int mig_rx_run(struct mig_rx *rx, uint64_t batch_nbytes, int timeout_ms);
struct mig_tx *mig_tx_new(const struct mig_pagemap *map, int fd, uint32_t max_frame_pages);
void mig_tx_free(struct mig_tx *t);
int mig_tx_run(struct mig_tx *t, uint64_t batch_nbytes, int timeout_ms);
"""
)

SOURCE_HEAD = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

/* Debian 12 ships 6.1 headers; these come from the KVM API documentation
 * (Documentation/virt/kvm/api.rst, section 4.143 KVM_PRE_FAULT_MEMORY). */
#ifndef KVM_CAP_PRE_FAULT_MEMORY
#define KVM_CAP_PRE_FAULT_MEMORY 236
#endif
#ifndef KVM_PRE_FAULT_MEMORY
struct kvm_pre_fault_memory {
    __u64 gpa;
    __u64 size;
    __u64 flags;
    __u64 padding[5];
};
#define KVM_PRE_FAULT_MEMORY _IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)
#endif

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC 0xAA
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

@SHARED@


/* The calling thread's kernel name (comm: top -H, ps -L, /proc/PID/task/TID/comm),
 * truncated by the kernel to 15 bytes.  Returns 0 or -errno. */
int mig_set_thread_name(const char *name) {
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0) < 0 ? -errno : 0;
}

void mig_run_io(struct kvm_run *run, struct mig_io_exit *out) {
    out->direction = run->io.direction;
    out->size = run->io.size;
    out->port = run->io.port;
    out->count = run->io.count;
    out->data_offset = run->io.data_offset;
}
uint64_t mig_run_fail_entry_reason(struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}
uint32_t mig_run_internal_suberror(struct kvm_run *run) { return run->internal.suberror; }
uint32_t mig_run_system_event_type(struct kvm_run *run) { return run->system_event.type; }

size_t mig_sizeof_xsave(void) { return sizeof(struct kvm_xsave); }
size_t mig_sizeof_fpu(void) { return sizeof(struct kvm_fpu); }
size_t mig_sizeof_xcrs(void) { return sizeof(struct kvm_xcrs); }
size_t mig_sizeof_vcpu_events(void) { return sizeof(struct kvm_vcpu_events); }
size_t mig_sizeof_debugregs(void) { return sizeof(struct kvm_debugregs); }

/* Returns 0 or -errno. */
int mig_set_supported_cpuid(int kvm_fd, int vcpu_fd) {
    int nent = 256;
    for (;;) {
        size_t sz = sizeof(struct kvm_cpuid2) + nent * sizeof(struct kvm_cpuid_entry2);
        struct kvm_cpuid2 *c = calloc(1, sz);
        if (!c) return -ENOMEM;
        c->nent = nent;
        if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) < 0) {
            int e = errno;
            free(c);
            if (e == E2BIG && nent < 4096) { nent *= 2; continue; }
            return -e;
        }
        int r = ioctl(vcpu_fd, KVM_SET_CPUID2, c);
        int e = errno;
        free(c);
        return r < 0 ? -e : 0;
    }
}

/* Returns the number of indices written to out, or -errno. */
int mig_get_msr_index_list(int kvm_fd, uint32_t *out, int max) {
    size_t sz = sizeof(struct kvm_msr_list) + (size_t)max * sizeof(uint32_t);
    struct kvm_msr_list *l = calloc(1, sz);
    if (!l) return -ENOMEM;
    l->nmsrs = max;
    if (ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, l) < 0) {
        int e = errno;
        free(l);
        return -e;
    }
    int n = l->nmsrs;
    memcpy(out, l->indices, n * sizeof(uint32_t));
    free(l);
    return n;
}

static struct kvm_msrs *mig_msrs_alloc(int n) {
    return calloc(1, sizeof(struct kvm_msrs) + (size_t)n * sizeof(struct kvm_msr_entry));
}

/* KVM_GET_MSRS returns how many entries it processed (stops at the first it cannot
 * read).  Returns that count, or -errno. */
int mig_get_msrs(int vcpu_fd, const uint32_t *indices, uint64_t *values, int n) {
    struct kvm_msrs *m = mig_msrs_alloc(n);
    if (!m) return -ENOMEM;
    m->nmsrs = n;
    for (int i = 0; i < n; i++) m->entries[i].index = indices[i];
    int r = ioctl(vcpu_fd, KVM_GET_MSRS, m);
    int e = errno;
    if (r > 0) for (int i = 0; i < r; i++) values[i] = m->entries[i].data;
    free(m);
    return r < 0 ? -e : r;
}

int mig_set_msrs(int vcpu_fd, const uint32_t *indices, const uint64_t *values, int n) {
    struct kvm_msrs *m = mig_msrs_alloc(n);
    if (!m) return -ENOMEM;
    m->nmsrs = n;
    for (int i = 0; i < n; i++) {
        m->entries[i].index = indices[i];
        m->entries[i].data = values[i];
    }
    int r = ioctl(vcpu_fd, KVM_SET_MSRS, m);
    int e = errno;
    free(m);
    return r < 0 ? -e : r;
}

int mig_get_dirty_log(int vm_fd, uint32_t slot, void *bitmap) {
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof log);
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    return ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log) < 0 ? -errno : 0;
}

int mig_clear_dirty_log(int vm_fd, uint32_t slot, uint64_t first_page, uint32_t num_pages,
                        void *bitmap) {
    struct kvm_clear_dirty_log c;
    memset(&c, 0, sizeof c);
    c.slot = slot;
    c.first_page = first_page;
    c.num_pages = num_pages;
    c.dirty_bitmap = bitmap;
    return ioctl(vm_fd, KVM_CLEAR_DIRTY_LOG, &c) < 0 ? -errno : 0;
}

/* One KVM_PRE_FAULT_MEMORY call; *gpa and *size are updated to what remains.
 * Returns 0 or -errno. */
int mig_pre_fault_memory(int vcpu_fd, uint64_t *gpa, uint64_t *size) {
    struct kvm_pre_fault_memory p;
    memset(&p, 0, sizeof p);
    p.gpa = *gpa;
    p.size = *size;
    int r = ioctl(vcpu_fd, KVM_PRE_FAULT_MEMORY, &p);
    int e = errno;
    *gpa = p.gpa;
    *size = p.size;
    return r < 0 ? -e : 0;
}


/* Reads up to max events in one read(2).  Returns the count, 0 when none is pending
 * (EAGAIN on a non-blocking fd), or -errno. */
int mig_uffd_read_events(int fd, struct mig_uffd_event *out, int max) {
    struct uffd_msg msgs[64];
    if (max > 64) max = 64;
    ssize_t r = read(fd, msgs, (size_t)max * sizeof(struct uffd_msg));
    if (r < 0) return errno == EAGAIN ? 0 : -errno;
    int n = (int)(r / (ssize_t)sizeof(struct uffd_msg));
    for (int i = 0; i < n; i++) {
        memset(&out[i], 0, sizeof out[i]);
        out[i].event = msgs[i].event;
        switch (msgs[i].event) {
        case UFFD_EVENT_PAGEFAULT:
            out[i].address = msgs[i].arg.pagefault.address;
            out[i].flags = msgs[i].arg.pagefault.flags;
            out[i].ptid = msgs[i].arg.pagefault.feat.ptid;
            break;
        case UFFD_EVENT_REMOVE:
        case UFFD_EVENT_UNMAP:
            out[i].start = msgs[i].arg.remove.start;
            out[i].end = msgs[i].arg.remove.end;
            break;
        case UFFD_EVENT_REMAP:
            out[i].start = msgs[i].arg.remap.from;
            out[i].end = msgs[i].arg.remap.to;
            out[i].address = msgs[i].arg.remap.len;
            break;
        default:
            break;
        }
    }
    return n;
}

int mig_page_is_zero(const uint8_t *page, size_t page_size) {
    const uint64_t *q = (const uint64_t *)page;
    size_t n = page_size / 8;
    /* The first word decides for almost every non-zero page. */
    if (q[0]) return 0;
    uint64_t acc = 0;
    for (size_t i = 0; i < n; i += 8) {
        acc |= q[i] | q[i + 1] | q[i + 2] | q[i + 3] | q[i + 4] | q[i + 5] | q[i + 6] | q[i + 7];
        if (acc) return 0;
    }
    return 1;
}

"""

SOURCE = (
    SOURCE_HEAD.replace("@SHARED@", SHARED + _PAGESTREAM_H)
    + _read("bitmap.c")
    + _read("pagestream.c")
    + _read("recvloop.c")
    + _read("pushloop.c")
)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "migrated.kernel._native",
    SOURCE,
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
