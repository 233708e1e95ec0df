/*
 * A tiny LD_PRELOAD fault injector for the failure-hygiene and crash tests
 * (device-mapper's error target is not available everywhere; this works wherever gcc is).
 *
 * Only file descriptors whose path contains $FAULT_PATH are affected:
 *   FAULT_WRITE_AFTER=N   writes fail once N bytes were written to such files
 *   FAULT_SYNC=1          fsync/fdatasync of such files fail
 *   FAULT_ERRNO=N         the errno returned (default EIO)
 *   FAULT_KILL_AT=K       SIGKILL the process instead of performing its K-th write or
 *                         truncate of such files (1-based): a crash at an exact point
 *   FAULT_COUNT_FILE=F    at exit, write the number of such writes/truncates to F
 * Run Node with UV_USE_IO_URING=0 so that libuv uses these libc calls.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*pwritev_fn)(int, const struct iovec *, int, off_t);
typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef int (*sync_fn)(int);
typedef int (*truncate_fn)(int, off_t);

#define REAL(name, type) \
  static type real_##name; \
  if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)

static long long written = 0;
static long long calls = 0;

static int fault_errno(void) {
  const char *s = getenv("FAULT_ERRNO");
  return s && *s ? atoi(s) : EIO;
}

static int matches(int fd) {
  const char *p = getenv("FAULT_PATH");
  if (!p || !*p || fd < 0) return 0;
  char link[64];
  char target[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n <= 0) return 0;
  target[n] = 0;
  return strstr(target, p) != NULL;
}

/** Counts a write/truncate of a matching file; dies at the FAULT_KILL_AT-th one. */
static void crash_point(int fd) {
  if (!matches(fd)) return;
  long long n = __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
  const char *k = getenv("FAULT_KILL_AT");
  if (k && *k && n == atoll(k)) {
    kill(getpid(), SIGKILL);
    for (;;) pause();
  }
}

__attribute__((destructor)) static void report_count(void) {
  const char *f = getenv("FAULT_COUNT_FILE");
  if (!f || !*f) return;
  REAL(write, write_fn);
  char buf[32];
  int len = snprintf(buf, sizeof buf, "%lld\n", calls);
  int fd = open(f, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    if (real_write(fd, buf, (size_t)len) < 0) { /* nothing to do */ }
    close(fd);
  }
}

static int write_fails(int fd, size_t len) {
  crash_point(fd);
  const char *s = getenv("FAULT_WRITE_AFTER");
  if (!s || !*s || !matches(fd)) return 0;
  long long budget = atoll(s);
  long long before = __atomic_fetch_add(&written, (long long)len, __ATOMIC_SEQ_CST);
  return before + (long long)len > budget;
}

static int sync_fails(int fd) {
  const char *s = getenv("FAULT_SYNC");
  return s && *s == '1' && matches(fd);
}

static size_t iov_len(const struct iovec *iov, int n) {
  size_t t = 0;
  for (int i = 0; i < n; i++) t += iov[i].iov_len;
  return t;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
  REAL(pwrite64, pwrite_fn);
  if (write_fails(fd, n)) { errno = fault_errno(); return -1; }
  return real_pwrite64(fd, buf, n, off);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
  REAL(pwrite, pwrite_fn);
  if (write_fails(fd, n)) { errno = fault_errno(); return -1; }
  return real_pwrite(fd, buf, n, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
  REAL(pwritev64, pwritev_fn);
  if (write_fails(fd, iov_len(iov, cnt))) { errno = fault_errno(); return -1; }
  return real_pwritev64(fd, iov, cnt, off);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
  REAL(pwritev, pwritev_fn);
  if (write_fails(fd, iov_len(iov, cnt))) { errno = fault_errno(); return -1; }
  return real_pwritev(fd, iov, cnt, off);
}

ssize_t write(int fd, const void *buf, size_t n) {
  REAL(write, write_fn);
  if (write_fails(fd, n)) { errno = fault_errno(); return -1; }
  return real_write(fd, buf, n);
}

int ftruncate64(int fd, off_t len) {
  REAL(ftruncate64, truncate_fn);
  crash_point(fd);
  return real_ftruncate64(fd, len);
}

int ftruncate(int fd, off_t len) {
  REAL(ftruncate, truncate_fn);
  crash_point(fd);
  return real_ftruncate(fd, len);
}

int fdatasync(int fd) {
  REAL(fdatasync, sync_fn);
  if (sync_fails(fd)) { errno = fault_errno(); return -1; }
  return real_fdatasync(fd);
}

int fsync(int fd) {
  REAL(fsync, sync_fn);
  if (sync_fails(fd)) { errno = fault_errno(); return -1; }
  return real_fsync(fd);
}
