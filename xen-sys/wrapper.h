/* Inputs for bindgen (build.rs). Only the stable, dynamically linked
 * libxenevtchn.so.1 / libxengnttab.so.1 APIs; no xenctrl. */
#include <stdint.h>
#include <xenevtchn.h>
#include <xengnttab.h>
