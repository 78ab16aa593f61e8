#pragma once
#include <stdint.h>
#include <sys/types.h>

/* Linux calls that Glibc's Swift overlay does not expose (they need _GNU_SOURCE). */
int cairn_punch_hole(int fd, int64_t offset, int64_t length);
int cairn_seek_data_whence(void);
int cairn_seek_hole_whence(void);
int cairn_syncfs(int fd);
int cairn_start_writeback(int fd, int64_t offset, int64_t length);
void cairn_malloc_tune(void);
void cairn_heap_prefer_hugepages(size_t bytes);
/* statfs(2)'s f_type of the file system holding path; -1 (errno set) on failure. */
int64_t cairn_fs_type(const char *path);
