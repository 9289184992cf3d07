/* LD_PRELOAD shim for scripts/bench-infer AMX=off: refuses arch_prctl(ARCH_REQ_XCOMP_PERM), the request ONNX Runtime's
 * MLAS makes before it dispatches integer GEMMs to AMX tiles (MlasInitAMX). Refused, MLAS falls back to its
 * AVX-512 VNNI kernels, so one machine can time both kernel families on the same model. Every other syscall() goes
 * to libc's. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/syscall.h>

#define ARCH_REQ_XCOMP_PERM 0x1023

long syscall(long number, ...) {
    va_list ap;
    va_start(ap, number);
    long a[6];
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_arch_prctl && a[0] == ARCH_REQ_XCOMP_PERM) {
        errno = EPERM;
        return -1;
    }
    static long (*libc_syscall)(long, ...);
    if (!libc_syscall) libc_syscall = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return libc_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
