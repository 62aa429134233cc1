/* The CUDA runtime calls that torch makes to trace and compile a graph on cuda tensors (device count, current
 * device, streams, events, device properties), answered as one sm_90 card. Preloaded ahead of libcudart, whose
 * symbol version it carries, so torch's own references bind here. Nothing can run: cudaMalloc, copies and kernel
 * launches are left to the real runtime, which fails them (no driver). See __init__.py. */
#include <stddef.h>
#include <string.h>
#include <cuda_runtime_api.h>

#ifdef cudaGetDeviceProperties /* some CUDA 12 headers map it to the _v2 entry point */
#undef cudaGetDeviceProperties
#endif

/* The card: FAKE_* definitions from CARD in __init__.py (one description for both halves). */
#ifndef FAKE_MULTI_PROCESSOR_COUNT
#error "build with benchmarks/fakecuda.build(), which defines the card (FAKE_*)"
#endif

cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaDeviceGetStreamPriorityRange(int *least, int *greatest) {
  if (least) *least = 0;
  if (greatest) *greatest = -5;
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int *v) { *v = CUDART_VERSION; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int *v) { *v = CUDART_VERSION; return cudaSuccess; }
cudaError_t cudaStreamQuery(cudaStream_t s) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t s) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus *status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode *mode) { return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags) {
  static int event;
  *e = (cudaEvent_t)&event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) { return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) { return cudaSuccess; }
cudaError_t cudaEventQuery(cudaEvent_t e) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t e) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) { return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t e) {
  return "a CUDA call that benchmarks/fakecuda does not answer (no GPU here: nothing can run)";
}
const char *cudaGetErrorName(cudaError_t e) { return "fakecuda"; }

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device) {
  memset(p, 0, sizeof(*p));
  strncpy(p->name, FAKE_NAME, sizeof(p->name) - 1);
  p->major = FAKE_MAJOR;
  p->minor = FAKE_MINOR;
  p->multiProcessorCount = FAKE_MULTI_PROCESSOR_COUNT;
  p->totalGlobalMem = FAKE_TOTAL_MEMORY;
  p->warpSize = FAKE_WARP_SIZE;
  p->maxThreadsPerBlock = FAKE_MAX_THREADS_PER_BLOCK;
  p->maxThreadsPerMultiProcessor = FAKE_MAX_THREADS_PER_MULTI_PROCESSOR;
  p->regsPerMultiprocessor = FAKE_REGS_PER_MULTIPROCESSOR;
  p->regsPerBlock = FAKE_REGS_PER_MULTIPROCESSOR; /* the whole file per block on sm_70 and later */
  p->sharedMemPerBlock = FAKE_SHARED_MEMORY_PER_BLOCK;
  p->sharedMemPerBlockOptin = FAKE_SHARED_MEMORY_PER_BLOCK_OPTIN;
  p->sharedMemPerMultiprocessor = FAKE_SHARED_MEMORY_PER_MULTIPROCESSOR;
  p->l2CacheSize = FAKE_L2_CACHE_SIZE;
  p->memoryBusWidth = FAKE_MEMORY_BUS_WIDTH;
  /* launch limits of every card since sm_30 */
  p->maxThreadsDim[0] = 1024;
  p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 0x7fffffff;
  p->maxGridSize[1] = 65535;
  p->maxGridSize[2] = 65535;
  return cudaSuccess;
}
