// What this CPU and its operating system let a process run, for choosing among the builds of the CPU kernels
// (sce_jax/kernels/cpu_library.py). Compiled for the baseline architecture (no -march): it executes only cpuid,
// xgetbv (after cpuid says the OS enabled it) and, on Linux, one arch_prctl. Plain C exports, loaded with ctypes.

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define SCE_JAX_X86 1
#endif

namespace {

// Feature bits of SceJaxCpuFeatures (the Python side names them: cpu_library.FEATURE_BITS).
enum : uint64_t {
  kX86_64_V2 = 1u << 0,   // SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B
  kAvx2 = 1u << 1,        // AVX, AVX2 with the OS saving YMM state
  kX86_64_V3 = 1u << 2,   // kAvx2 + FMA, F16C, BMI1, BMI2, LZCNT, MOVBE
  kX86_64_V4 = 1u << 3,   // AVX-512 F, BW, CD, DQ, VL with the OS saving ZMM and opmask state
  kAvx512Vnni = 1u << 4,  // AVX512_VNNI (vpdpwssd, vpdpbusd)
  kAmxInt8 = 1u << 5,     // AMX-TILE and AMX-INT8 with the OS saving tile state (XCR0 17, 18)
};

#ifdef SCE_JAX_X86
bool Bit(uint32_t reg, int bit) { return (reg >> bit) & 1u; }

uint64_t Xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

uint64_t Detect() {
  uint32_t a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
  const uint32_t max_leaf = a;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const uint32_t c1 = c;
  uint32_t b7 = 0, c7 = 0, d7 = 0;
  if (max_leaf >= 7) __cpuid_count(7, 0, a, b7, c7, d7);
  uint32_t c81 = 0;
  if (__get_cpuid(0x80000001, &a, &b, &c, &d)) c81 = c;

  uint64_t features = 0;
  const bool v2 = Bit(c1, 0) && Bit(c1, 9) && Bit(c1, 19) && Bit(c1, 20) && Bit(c1, 23) && Bit(c1, 13);
  if (v2) features |= kX86_64_V2;
  const bool osxsave = Bit(c1, 27);
  const uint64_t xcr0 = osxsave ? Xcr0() : 0;
  const bool ymm_state = (xcr0 & 0x6) == 0x6;     // SSE and AVX state
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;   // plus opmask, ZMM_Hi256, Hi16_ZMM
  const bool tile_state = (xcr0 & 0x60000) == 0x60000;  // XTILECFG, XTILEDATA
  const bool avx2 = v2 && ymm_state && Bit(c1, 28) && Bit(b7, 5);
  if (avx2) features |= kAvx2;
  const bool v3 = avx2 && Bit(c1, 12) && Bit(c1, 29) && Bit(c1, 22) && Bit(b7, 3) && Bit(b7, 8) && Bit(c81, 5);
  if (v3) features |= kX86_64_V3;
  const bool v4 = v3 && zmm_state && Bit(b7, 16) && Bit(b7, 17) && Bit(b7, 28) && Bit(b7, 30) && Bit(b7, 31);
  if (v4) features |= kX86_64_V4;
  if (v4 && Bit(c7, 11)) features |= kAvx512Vnni;
  if (v4 && tile_state && Bit(d7, 24) && Bit(d7, 25)) features |= kAmxInt8;
  return features;
}
#endif

}  // namespace

// The kFeature bits above that this CPU has and the OS has enabled (0 on other architectures).
extern "C" uint64_t SceJaxCpuFeatures() {
#ifdef SCE_JAX_X86
  return Detect();
#else
  return 0;
#endif
}

// Asks Linux for this process's permission to use the AMX tile data (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA):
// 1 when granted (or already granted), 0 otherwise (no AMX, an older kernel, another OS).
extern "C" int SceJaxRequestAmx() {
#if defined(SCE_JAX_X86) && defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 1 : 0;
#else
  return 0;
#endif
}
