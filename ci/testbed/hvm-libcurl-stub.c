/* A libcurl-gnutls.so.4 for the hvm-tis guest's initramfs (ci/testbed/build-images.sh).
 *
 * Debian's tpm2 (tpm2-tools 5.4) links libcurl-gnutls only for tpm2_getekcertificate, which
 * downloads an EK certificate from a vendor's web service; the HVM guest never runs it (it reads
 * its EK certificate from NV). Real libcurl-gnutls pulls 28 libraries (11 MB of the guest's 19 MB
 * of libraries: gnutls, krb5, ldap, ssh2, ...), which the device model loads into the guest and the
 * guest's kernel unpacks, under nested TCG, at every boot. tpm2 is linked with BIND_NOW, so the
 * dynamic linker needs every curl symbol it imports, at version CURL_GNUTLS_3, to start at all:
 * this library defines exactly those and fails every call the way libcurl reports a failure
 * (NULL handle, CURLE_FAILED_INIT). Built by build-images.sh (-shared -nostdlib, soname
 * libcurl-gnutls.so.4, hvm-libcurl-stub.map). Written for this project; no libcurl code. */
#include <stddef.h>

#define CURLE_FAILED_INIT 2

void *curl_easy_init(void) { return NULL; }
int curl_easy_setopt(void *h, int opt, ...) { (void)h; (void)opt; return CURLE_FAILED_INIT; }
int curl_easy_perform(void *h) { (void)h; return CURLE_FAILED_INIT; }
void curl_easy_cleanup(void *h) { (void)h; }
const char *curl_easy_strerror(int code)
{
    (void)code;
    return "no libcurl in this initramfs (ci/testbed/hvm-libcurl-stub.c)";
}
char *curl_easy_escape(void *h, const char *s, int len) { (void)h; (void)s; (void)len; return NULL; }
char *curl_easy_unescape(void *h, const char *s, int len, int *outlen)
{
    (void)h; (void)s; (void)len;
    if (outlen)
        *outlen = 0;
    return NULL;
}
void curl_free(void *p) { (void)p; }
int curl_global_init(long flags) { (void)flags; return CURLE_FAILED_INIT; }
void curl_global_cleanup(void) {}
