//! One-shot xenstore access for the CLI's synchronous code: a connection per call, on a
//! current-thread runtime of its own.

/// Runs `f` with a fresh xenstore connection; errors as text.
pub(crate) fn with_xs<T>(f: impl AsyncFnOnce(&xen_platform::xenstore::XsClient) -> Result<T, String>) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (xs, _events) = xen_platform::xenstore::XsClient::open().await.map_err(|e| format!("xenstore: {e}"))?;
        f(&xs).await
    })
}

/// Writes `value` at the absolute xenstore `path`.
pub(crate) fn xs_write(path: &str, value: &str) -> Result<(), String> {
    use xen_platform::xenstore::Xenstore;
    with_xs(async |xs| xs.write(path, value).await.map_err(|e| e.to_string()))
}
