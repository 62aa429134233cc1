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

static int sm_count = 132; /* H100 SXM; the H200 has the same chip */

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
  strcpy(p->name, "NVIDIA H100 80GB HBM3 (benchmarks/fakecuda)");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = sm_count;
  p->totalGlobalMem = 80ull << 30;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsPerMultiProcessor = 2048;
  p->regsPerMultiprocessor = 65536;
  p->regsPerBlock = 65536;
  p->sharedMemPerBlock = 49152;
  p->sharedMemPerBlockOptin = 232448;
  p->sharedMemPerMultiprocessor = 233472;
  p->l2CacheSize = 50 << 20;
  p->memoryBusWidth = 5120;
  p->maxThreadsDim[0] = 1024;
  p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 0x7fffffff;
  p->maxGridSize[1] = 65535;
  p->maxGridSize[2] = 65535;
  return cudaSuccess;
}
