//! Allocator tuning for CPU forwards.
//!
//! Each operation of a forward allocates fresh activation tensors of several megabytes. glibc serves
//! blocks above its mmap threshold with `mmap` and unmaps them on free, and trims the heap top, so the
//! next operation faults the same pages in again: measured at about 15% of a LLaMA-shaped forward at
//! 8 x 128 tokens. [`keep_freed_memory`] raises those thresholds so freed tensors stay in the process
//! for the next operation (the process's peak is unchanged; it just does not shrink between
//! operations). The `nnscope` binary calls it at start; library users opt in.

/// Keeps freed tensor memory in the process instead of returning it to the OS after every operation
/// (glibc only; elsewhere a no-op). Returns whether the allocator accepted the settings.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes allocator parameters; it is safe to call at any time, and
        // the values are within glibc's documented ranges (the mmap threshold at most 32 MiB on
        // 64-bit targets).
        unsafe {
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            let pad = libc::mallopt(libc::M_TOP_PAD, 256 * 1024 * 1024);
            let ok = mmap == 1 && trim == 1 && pad == 1;
            KEEPING.store(ok, std::sync::atomic::Ordering::Relaxed);
            ok
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Called before a CPU operation allocates an output of `bytes`: when that is more than 32 MiB
/// (glibc's largest mmap threshold; in practice the logits of a batch, 196 MiB for GPT-2 at
/// 8 x 128 tokens) and the process keeps freed memory ([`keep_freed_memory`]), the allocator's free
/// pages are handed back first (`malloc_trim`). Otherwise the freed activations of the layers (tens
/// of MiB, in holes the logits do not fit in) stay resident under the logits and add to the peak:
/// measured 30-250 MiB above weights + logits on GPT-2 at 8 x 128. The pages given back are faulted
/// in again by the next forward's layers, well under 1% of a forward of this size.
pub(crate) fn before_large_output(bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if bytes > 32 * 1024 * 1024 && KEEPING.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: `malloc_trim` only releases free memory of the allocator; safe at any time.
        unsafe {
            libc::malloc_trim(0);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// Whether [`keep_freed_memory`] took effect in this process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static KEEPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
