//! Guest memory access: bounds-checked reads, and results written through the guest's own
//! allocator (the SDK frees them with the same length).

use wasmtime::{Caller, Extern, Memory};

use super::{status, HostState};

fn memory(caller: &mut Caller<'_, HostState>) -> Result<Memory, i32> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(status::INTERNAL_FAILURE),
    }
}

/// Copies `len` bytes at `ptr` out of the guest.
pub fn read(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<Vec<u8>, i32> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&caller)
        .get(ptr..ptr.checked_add(len).ok_or(status::BAD_ARGUMENT)?)
        .map(<[u8]>::to_vec)
        .ok_or(status::BAD_ARGUMENT)
}

pub fn read_string(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<String, i32> {
    read(caller, ptr, len).map(|b| String::from_utf8_lossy(&b).into_owned())
}

pub fn write(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let mem = memory(caller)?;
    let ptr = ptr as u32 as usize;
    mem.data_mut(caller)
        .get_mut(ptr..ptr.checked_add(bytes.len()).ok_or(status::BAD_ARGUMENT)?)
        .ok_or(status::BAD_ARGUMENT)?
        .copy_from_slice(bytes);
    Ok(())
}

pub fn write_u32(caller: &mut Caller<'_, HostState>, ptr: i32, v: u32) -> Result<(), i32> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Allocates `bytes.len()` in the guest, copies, and writes (ptr, size) to the out-params.
/// Empty results are (0, 0) without an allocation.
pub fn return_bytes(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
    ptr_out: i32,
    size_out: i32,
) -> Result<(), i32> {
    if bytes.is_empty() {
        write_u32(caller, ptr_out, 0)?;
        return write_u32(caller, size_out, 0);
    }
    let alloc = ["malloc", "proxy_on_memory_allocate"]
        .iter()
        .find_map(|name| caller.get_export(name).and_then(Extern::into_func))
        .ok_or(status::INTERNAL_FAILURE)?
        .typed::<i32, i32>(&caller)
        .map_err(|_| status::INTERNAL_FAILURE)?;
    let size = i32::try_from(bytes.len()).map_err(|_| status::BAD_ARGUMENT)?;
    // Re-entrant call into the guest allocator; it may grow memory, so look memory up after.
    let ptr = alloc
        .call(&mut *caller, size)
        .map_err(|_| status::INTERNAL_FAILURE)?;
    if ptr == 0 {
        return Err(status::INTERNAL_FAILURE);
    }
    write(caller, ptr, bytes)?;
    write_u32(caller, ptr_out, ptr as u32)?;
    write_u32(caller, size_out, size as u32)
}

/// Turns a `Result<(), status>` into the status the guest sees.
pub fn code(r: Result<(), i32>) -> i32 {
    match r {
        Ok(()) => status::OK,
        Err(s) => s,
    }
}
