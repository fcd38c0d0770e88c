//! Weights from memory-mapped safetensors, without the file staying resident next to the copies.
//!
//! candle's `VarBuilder::from_mmaped_safetensors` copies every tensor out of the mapping, and the
//! mapped pages it read stay counted in the process's resident memory until the whole builder is
//! dropped, so loading peaked at twice the checkpoint size (bench/). This backend hands the pages of
//! each tensor back to the kernel (`madvise(MADV_DONTNEED)`) right after copying it: the file stays
//! in the page cache, but not in this process.

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor};
use std::path::PathBuf;

struct ReleasingMmap(MmapedSafetensors);

impl ReleasingMmap {
    /// Drops this process's pages of tensor `name` (whole pages inside its bytes only, so that a
    /// neighbouring tensor's pages are left alone).
    fn release(&self, name: &str) {
        #[cfg(target_os = "linux")]
        if let Ok(view) = self.0.get(name) {
            use std::os::raw::{c_int, c_void};
            extern "C" {
                fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
            }
            const MADV_DONTNEED: c_int = 4;
            // The smallest page size Linux uses on the platforms candle supports; a larger real
            // page size only makes some calls fail (EINVAL), which is harmless.
            const PAGE: usize = 4096;
            let data = view.data();
            let start = (data.as_ptr() as usize).div_ceil(PAGE) * PAGE;
            let end = (data.as_ptr() as usize + data.len()) / PAGE * PAGE;
            if end > start {
                // SAFETY: the range lies inside a read-only private file mapping that is still
                // mapped (owned by `self.0`). MADV_DONTNEED on such pages only drops them from
                // this process; a later read faults the same bytes back in from the unchanged
                // file, so every slice into the mapping keeps its contents.
                unsafe { madvise(start as *mut c_void, end - start, MADV_DONTNEED) };
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = name;
    }
}

impl candle_nn::var_builder::SimpleBackend for ReleasingMmap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt())?
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.0.load(name, dev)?.to_dtype(dtype)?;
        // `load` copied the bytes into the tensor's own storage (CPU) or uploaded them (GPU).
        self.release(name);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

/// A `VarBuilder` over memory-mapped safetensors files that releases each tensor's mapped pages once
/// it is loaded.
///
/// # Safety
/// As `candle_nn::VarBuilder::from_mmaped_safetensors`: the files must not be modified while mapped.
pub(crate) unsafe fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<candle_nn::VarBuilder<'static>> {
    let st = MmapedSafetensors::multi(files)?;
    Ok(candle_nn::VarBuilder::from_backend(
        Box::new(ReleasingMmap(st)),
        dtype,
        device.clone(),
    ))
}
