#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#include <malloc.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include "CLinuxShims.h"

int cairn_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}
int cairn_seek_data_whence(void) { return SEEK_DATA; }
int cairn_seek_hole_whence(void) { return SEEK_HOLE; }
int cairn_syncfs(int fd) { return syncfs(fd); }

/* Starts write-back of a range without waiting (so a final fsync has little left to do). */
int cairn_start_writeback(int fd, int64_t offset, int64_t length) {
    return sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE);
}

/* Keep freed chunk-sized buffers in the heap instead of returning them to the kernel after
 * every call: without this, AES-GCM and zstd on multi-MiB buffers page-fault fresh memory
 * on each chunk (measured 10x slower, see PERFORMANCE.md). */
void cairn_malloc_tune(void) {
    mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024);
    mallopt(M_MMAP_THRESHOLD, 64 * 1024 * 1024);
}

/* Asks for transparent huge pages under the next `bytes` of the heap: allocated, advised and
 * freed untouched, the range goes back to the top of the heap (kept by the trim threshold
 * above), and the next large allocations (scrypt's 32 MiB table, the workers' buffers) fault
 * it in 2 MiB at a time instead of 4 KiB: minor faults of a restore 13k -> 5k, 5-10 ms of a
 * 60-70 ms key derivation. */
void cairn_heap_prefer_hugepages(size_t bytes) {
    const uintptr_t huge = 2u << 20;
    char *p = malloc(bytes);
    if (p == NULL) return;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (end > start) (void)madvise((void *)start, end - start, MADV_HUGEPAGE);
    free(p);
}

int64_t cairn_fs_type(const char *path) {
    struct statfs st;
    if (statfs(path, &st) != 0) return -1;
    return (int64_t)(uint32_t)st.f_type;
}
