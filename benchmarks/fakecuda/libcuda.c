/* A libcuda.so.1 for torch's lazily loaded driver API (c10::cuda::DriverAPI): the entry points it looks up, each
 * saying yes, and a primary context that is "active" so the autograd engine's device threads take the device.
 * For tracing only; see __init__.py. */
#define YES(name) int name(void) { return 0; }
YES(cuInit) YES(cuCtxFromGreenCtx) YES(cuCtxPopCurrent) YES(cuCtxPushCurrent) YES(cuCtxSetCurrent)
YES(cuDevResourceGenerateDesc) YES(cuDevSmResourceSplitByCount) YES(cuDeviceGetDevResource) YES(cuGreenCtxCreate)
YES(cuGreenCtxDestroy) YES(cuGreenCtxStreamCreate) YES(cuLogsRegisterCallback) YES(cuLogsUnregisterCallback)
YES(cuMemAddressFree) YES(cuMemAddressReserve) YES(cuMemCreate) YES(cuMemExportToShareableHandle)
YES(cuMemGetAddressRange) YES(cuMemGetAllocationGranularity) YES(cuMemGetAllocationPropertiesFromHandle)
YES(cuMemImportFromShareableHandle) YES(cuMemMap) YES(cuMemRelease) YES(cuMemRetainAllocationHandle)
YES(cuMemSetAccess) YES(cuMemUnmap) YES(cuMemsetD32Async) YES(cuMulticastAddDevice) YES(cuMulticastBindMem)
YES(cuMulticastCreate) YES(cuMulticastUnbind) YES(cuStreamWriteValue32)

static int context;
int cuCtxGetCurrent(void **ctx) { *ctx = &context; return 0; }
int cuDeviceGet(int *dev, int ordinal) { *dev = ordinal; return 0; }
int cuDeviceGetCount(int *n) { *n = 1; return 0; }
int cuDeviceGetAttribute(int *value, int attribute, int dev) { *value = 0; return 0; }
int cuDevicePrimaryCtxGetState(int dev, unsigned *flags, int *active) { *flags = 0; *active = 1; return 0; }
int cuDriverGetVersion(int *version) { *version = 13000; return 0; }
int cuGetErrorString(int error, const char **text) { *text = "benchmarks/fakecuda libcuda"; return 0; }
