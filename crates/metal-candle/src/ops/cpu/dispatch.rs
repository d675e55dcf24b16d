//! Runs kernel loops with the widest vector instructions the CPU has.
//!
//! The library is built for the baseline of its target (SSE2 on x86-64), where the
//! compiler vectorises the kernels' loops 4 floats wide. [`with_widest_simd`] detects AVX-512
//! or AVX2 at run time (once) and calls the loop through a function compiled with those
//! features. The loop bodies are `#[inline(always)]` closures and helpers, so
//! they are inlined into that function and vectorised 8 or 16 wide; on other CPUs and
//! architectures the same code runs as built.

/// The vector extensions a loop may be compiled for, widest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SimdLevel {
    /// The build's baseline (SSE2 on x86-64; NEON on aarch64).
    Baseline,
    /// x86-64 AVX2 with FMA.
    Avx2,
    /// x86-64 AVX-512 (F and VL) with FMA.
    Avx512,
}

/// The widest level this CPU supports, capped by `METAL_CANDLE_CPU_SIMD` (`baseline`, `avx2`
/// or `avx512`) when set, to compare or test the narrower paths. Read once.
pub(crate) fn simd_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("METAL_CANDLE_CPU_SIMD").as_deref() {
            Err(_) | Ok("avx512") => SimdLevel::Avx512,
            Ok("avx2") => SimdLevel::Avx2,
            Ok("baseline") => SimdLevel::Baseline,
            // A typo must not silently test or benchmark a different path than intended.
            Ok(other) => panic!(
                "METAL_CANDLE_CPU_SIMD={other:?} is not a level: use baseline, avx2 or avx512"
            ),
        };
        detected_level().min(cap)
    })
}

fn detected_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = std::arch::is_x86_feature_detected!("fma");
        if fma
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return SimdLevel::Avx512;
        }
        if fma && std::arch::is_x86_feature_detected!("avx2") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Baseline
}

/// Calls `f` from a function compiled for [`simd_level`], passing whether that code has fused
/// multiply-add (so that `f` can choose `mul_add`, which without FMA is a slow libm call; the
/// flag is a constant in each compiled copy, so the choice costs nothing). `f` (and what it
/// calls in hot loops) must be `#[inline(always)]` to benefit.
#[inline(always)]
pub(crate) fn with_widest_simd<R>(f: impl FnOnce(bool) -> R) -> R {
    match simd_level() {
        // SAFETY: `simd_level` only returns a level whose features this CPU has.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { x86::avx512(f) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::avx2(f) },
        // Every aarch64 CPU has FMA in its baseline.
        _ => f(cfg!(target_arch = "aarch64")),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn avx512<R>(f: impl FnOnce(bool) -> R) -> R {
        f(true)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<R>(f: impl FnOnce(bool) -> R) -> R {
        f(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_the_closure_once_and_returns_its_value() {
        let mut calls = 0;
        let v = with_widest_simd(|_fma| {
            calls += 1;
            (0..100).map(|i| i as f32).sum::<f32>()
        });
        assert_eq!((v, calls), (4950.0, 1));
    }
}
