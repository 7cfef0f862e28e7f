//! In-process nftables through `libnftables.so.1` (shipped with Debian's nftables package),
//! loaded at run time. Running a transaction this way costs well under a millisecond,
//! against 10-20 ms for starting the `nft` binary.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Mutex;

/// libnftables could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LibNftError {
    /// The library or one of its functions is missing.
    #[error("loading libnftables.so.1: {0}")]
    Load(#[from] libloading::Error),
    /// `nft_ctx_new` returned NULL.
    #[error("nft_ctx_new failed")]
    Context,
    /// The script contains a NUL byte.
    #[error("the nft script contains a NUL byte")]
    Nul,
    /// The transaction was rejected; nothing of it was applied.
    #[error("{0}")]
    Rejected(String),
}

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

struct Ctx {
    ptr: *mut c_void,
    free: CtxFree,
}

// SAFETY: an nft context is not tied to the thread that created it; it is only ever used
// behind the Mutex in `LibNft`, so one thread at a time touches it.
unsafe impl Send for Ctx {}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from nft_ctx_new, is non-null and is freed exactly once here.
        unsafe { (self.free)(self.ptr) }
    }
}

/// A loaded libnftables with one context.
pub struct LibNft {
    // Field order matters: the context is freed before the library is unloaded.
    ctx: Mutex<Ctx>,
    run: RunCmd,
    get_error: GetBuffer,
    _lib: libloading::Library,
}

impl std::fmt::Debug for LibNft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LibNft")
    }
}

impl LibNft {
    /// Loads `libnftables.so.1` and creates a context whose errors are buffered.
    pub fn load() -> Result<LibNft, LibNftError> {
        // SAFETY: loading a system library runs its initialisers; libnftables' are plain
        // C constructors without preconditions.
        let lib = unsafe { libloading::Library::new("libnftables.so.1")? };
        // SAFETY: the symbols are looked up with the signatures libnftables.h declares.
        let (new, free, buffer_error, buffer_output, get_error, run) = unsafe {
            (
                *lib.get::<CtxNew>(b"nft_ctx_new\0")?,
                *lib.get::<CtxFree>(b"nft_ctx_free\0")?,
                *lib.get::<CtxBuffer>(b"nft_ctx_buffer_error\0")?,
                *lib.get::<CtxBuffer>(b"nft_ctx_buffer_output\0")?,
                *lib.get::<GetBuffer>(b"nft_ctx_get_error_buffer\0")?,
                *lib.get::<RunCmd>(b"nft_run_cmd_from_buffer\0")?,
            )
        };
        // SAFETY: nft_ctx_new(NFT_CTX_DEFAULT = 0) has no preconditions.
        let ptr = unsafe { new(0) };
        if ptr.is_null() {
            return Err(LibNftError::Context);
        }
        let ctx = Ctx { ptr, free };
        // SAFETY: `ctx.ptr` is a live context; buffering only changes where text goes.
        unsafe {
            buffer_error(ctx.ptr);
            buffer_output(ctx.ptr);
        }
        Ok(LibNft {
            ctx: Mutex::new(ctx),
            run,
            get_error,
            _lib: lib,
        })
    }

    /// Runs an nft script as one transaction.
    pub fn run(&self, script: &str) -> Result<(), LibNftError> {
        let script = CString::new(script).map_err(|_| LibNftError::Nul)?;
        let ctx = self.ctx.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the context is live and exclusively ours under the lock; the script is a
        // NUL-terminated string that outlives the call.
        let rc = unsafe { (self.run)(ctx.ptr, script.as_ptr()) };
        // SAFETY: same context; the returned buffer stays valid until the next call on it,
        // and it is copied before the lock is released.
        let err = unsafe {
            let p = (self.get_error)(ctx.ptr);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(LibNftError::Rejected(err.trim().to_owned()))
        }
    }
}
