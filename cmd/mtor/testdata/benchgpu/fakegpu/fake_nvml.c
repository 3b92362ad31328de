/*
 * FAKE libnvidia-ml.so.1, for TestBenchGPUScript only: one GPU that draws a
 * constant FAKE_GPU_WATTS (default 50), whose total-energy counter (mJ) is
 * W × milliseconds since the epoch. mtor (through go-nvml) and the
 * script's independent reader (nvml_energy.py, through ctypes) both load it
 * through LD_LIBRARY_PATH, as they would the driver's, so that mtor's
 * energy_mj and the script's readings measure one thing. Only the calls
 * these two make are here.
 *
 * Build: cc -shared -fPIC -o libnvidia-ml.so.1 fake_nvml.c
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
enum { NVML_SUCCESS = 0, NVML_ERROR_INVALID_ARGUMENT = 2 };
typedef struct fakeDevice *nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;

static struct fakeDevice { int unused; } device0;

static unsigned long long watts(void) {
	const char *w = getenv("FAKE_GPU_WATTS");
	return w && *w ? strtoull(w, NULL, 10) : 50;
}

static void copy(char *dst, unsigned int n, const char *src) {
	if (n == 0) return;
	strncpy(dst, src, n - 1);
	dst[n - 1] = 0;
}

nvmlReturn_t nvmlInit(void) { return NVML_SUCCESS; }
nvmlReturn_t nvmlInit_v2(void) { return NVML_SUCCESS; }
nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }
const char *nvmlErrorString(nvmlReturn_t r) { return r ? "fake NVML error" : "Success"; }

nvmlReturn_t nvmlDeviceGetCount(unsigned int *n) { *n = 1; return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) { *n = 1; return NVML_SUCCESS; }

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int i, nvmlDevice_t *d) {
	if (i != 0) return NVML_ERROR_INVALID_ARGUMENT;
	*d = &device0;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) { return nvmlDeviceGetHandleByIndex(i, d); }

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int n) {
	copy(name, n, "FAKE GPU for tests");
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int n) {
	copy(uuid, n, "GPU-00000000-fake");
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
	m->total = 8ULL << 30;
	m->used = 1ULL << 30;
	m->free = m->total - m->used;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
	u->gpu = 0;
	u->memory = 0;
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *mw) {
	*mw = (unsigned int)(watts() * 1000);
	return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *mj) {
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	*mj = ((unsigned long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000) * watts();
	return NVML_SUCCESS;
}
