//! The raw PJRT C API: the structs and function-pointer slots this crate uses, transcribed by
//! hand from `xla/pjrt/c/pjrt_c_api.h` (openxla/xla).
//!
//! Only what dist-tpu calls is here. Field order is the header's; every argument struct begins
//! with `struct_size` and `extension_start` (called `priv` in old headers; same ABI). The
//! [`PJRT_Api`] table is declared as a *prefix* of the header's: the slots up to
//! `PJRT_Buffer_ReadyEvent`, which have not moved since the API's first release (new slots are
//! only ever appended, and `PJRT_API_MAJOR` is still 0); the loader checks that the plugin's
//! table is at least that long.
//!
//! ## `struct_size` and newer plugins
//! A plugin checks `args->struct_size >= its own *_STRUCT_SIZE` (XLA's
//! `ActualStructSizeIsGreaterOrEqual`) and reads only the fields it knows. A plugin built from
//! a newer header than ours therefore refuses structs sized as our header says (for example
//! `PJRT_ExecuteOptions`, which has grown by ten fields since `launch_id`). Every argument
//! struct is therefore passed inside [`Args`], which appends [`TAIL_BYTES`] of zeros and
//! reports the whole size: fields the plugin knows and we do not read as zero (null pointer, 0,
//! false: "not set", what a caller built from the newer header passes when it sets nothing),
//! and out-fields it knows land in our zeroed tail. The `*_STRUCT_SIZE` functions below give
//! the header's size (last field's offset + size) at the version we transcribed, for the tests
//! that pin the transcription.
#![allow(non_camel_case_types, non_snake_case, missing_docs)]

use std::ffi::{c_char, c_int, c_void};

/// `PJRT_API_MAJOR` this crate speaks.
pub const PJRT_API_MAJOR: i32 = 0;

/// Bytes of zeros appended to every argument struct (see the module docs).
pub const TAIL_BYTES: usize = 512;

macro_rules! opaque {
    ($($name:ident),* $(,)?) => {$(
        #[repr(C)]
        #[derive(Debug)]
        pub struct $name {
            _private: [u8; 0],
        }
    )*};
}
opaque!(
    PJRT_Error,
    PJRT_Event,
    PJRT_Client,
    PJRT_Device,
    PJRT_DeviceDescription,
    PJRT_Memory,
    PJRT_Executable,
    PJRT_LoadedExecutable,
    PJRT_Buffer,
);

/// Types whose all-zero bit pattern is a valid value (integers, raw pointers, `Option<fn>`,
/// `bool`, and structs of those) and that begin with a `size_t struct_size`.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, start with a `usize` field and be valid when zeroed.
pub unsafe trait Plain: Sized {}

macro_rules! pjrt_struct {
    ($(#[$m:meta])* $name:ident { $($f:ident : $t:ty),* $(,)? } last $last:ident : $lt:ty) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug)]
        pub struct $name {
            pub struct_size: usize,
            pub extension_start: *mut c_void,
            $(pub $f: $t,)*
        }
        // SAFETY: repr(C), starts with struct_size, every field is an integer, a raw pointer,
        // an Option of a function pointer or a bool: all valid when zero.
        unsafe impl Plain for $name {}
        impl $name {
            /// The header's `*_STRUCT_SIZE` at the transcribed version (offset of the last
            /// field plus its size).
            pub const fn STRUCT_SIZE() -> usize {
                std::mem::offset_of!($name, $last) + std::mem::size_of::<$lt>()
            }
        }
    };
}

/// `PJRT_Error_Code` values (absl status codes).
pub mod code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

/// `PJRT_Buffer_Type` values.
pub mod buffer_type {
    pub const PRED: i32 = 1;
    pub const S8: i32 = 2;
    pub const S16: i32 = 3;
    pub const S32: i32 = 4;
    pub const S64: i32 = 5;
    pub const U8: i32 = 6;
    pub const U16: i32 = 7;
    pub const U32: i32 = 8;
    pub const U64: i32 = 9;
    pub const F16: i32 = 10;
    pub const F32: i32 = 11;
    pub const F64: i32 = 12;
    pub const BF16: i32 = 13;
    pub const F8E5M2: i32 = 16;
    pub const F8E4M3FN: i32 = 17;
}

/// `PJRT_HostBufferSemantics_kImmutableOnlyDuringCall`: the runtime copies during the call.
pub const HOST_BUFFER_IMMUTABLE_ONLY_DURING_CALL: c_int = 0;
/// `PJRT_Buffer_MemoryLayout_Type_Tiled`.
pub const MEMORY_LAYOUT_TILED: c_int = 0;

/// `PJRT_NamedValue_Type` values.
pub mod named_value {
    pub const STRING: i32 = 0;
    pub const INT64: i32 = 1;
    pub const INT64_LIST: i32 = 2;
    pub const FLOAT: i32 = 3;
    pub const BOOL: i32 = 4;
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PJRT_Api_Version {
    pub struct_size: usize,
    pub extension_start: *mut c_void,
    pub major_version: c_int,
    pub minor_version: c_int,
}

/// `PJRT_CallbackError`: makes a `PJRT_Error` for a callback to return.
pub type PJRT_CallbackError =
    unsafe extern "C" fn(code: c_int, message: *const c_char, size: usize) -> *mut PJRT_Error;
/// Frees a value returned by the key-value get callback.
pub type PJRT_KeyValueGetCallback_ValueDeleter = unsafe extern "C" fn(value: *mut c_char);
/// The key-value get callback.
pub type PJRT_KeyValueGetCallback =
    unsafe extern "C" fn(args: *mut PJRT_KeyValueGetCallback_Args) -> *mut PJRT_Error;
/// The key-value put callback.
pub type PJRT_KeyValuePutCallback =
    unsafe extern "C" fn(args: *mut PJRT_KeyValuePutCallback_Args) -> *mut PJRT_Error;

/// `union { const char* string_value; int64_t int64_value; const int64_t* int64_array_value; float; bool }`
#[repr(C)]
#[derive(Clone, Copy)]
pub union NamedValueUnion {
    pub string_value: *const c_char,
    pub int64_value: i64,
    pub int64_array_value: *const i64,
    pub float_value: f32,
    pub bool_value: bool,
}

impl std::fmt::Debug for NamedValueUnion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NamedValueUnion(..)")
    }
}

pjrt_struct!(PJRT_NamedValue {
    name: *const c_char,
    name_size: usize,
    type_: c_int,
    value: NamedValueUnion,
    value_size: usize,
} last value_size: usize);

pjrt_struct!(PJRT_Error_Destroy_Args { error: *mut PJRT_Error } last error: *mut PJRT_Error);
pjrt_struct!(PJRT_Error_Message_Args {
    error: *const PJRT_Error,
    message: *const c_char,
    message_size: usize,
} last message_size: usize);
pjrt_struct!(PJRT_Error_GetCode_Args { error: *const PJRT_Error, code: c_int } last code: c_int);
pjrt_struct!(PJRT_Plugin_Initialize_Args {} last extension_start: *mut c_void);

pjrt_struct!(PJRT_Event_Destroy_Args { event: *mut PJRT_Event } last event: *mut PJRT_Event);
pjrt_struct!(PJRT_Event_IsReady_Args { event: *mut PJRT_Event, is_ready: bool } last is_ready: bool);
pjrt_struct!(PJRT_Event_Error_Args { event: *mut PJRT_Event } last event: *mut PJRT_Event);
pjrt_struct!(PJRT_Event_Await_Args { event: *mut PJRT_Event } last event: *mut PJRT_Event);

pjrt_struct!(PJRT_KeyValueGetCallback_Args {
    key: *const c_char,
    key_size: usize,
    timeout_in_ms: c_int,
    callback_error: *mut PJRT_CallbackError,
    user_arg: *mut c_void,
    value: *mut c_char,
    value_size: usize,
    value_deleter_callback: Option<PJRT_KeyValueGetCallback_ValueDeleter>,
} last value_deleter_callback: Option<PJRT_KeyValueGetCallback_ValueDeleter>);

pjrt_struct!(PJRT_KeyValuePutCallback_Args {
    key: *const c_char,
    key_size: usize,
    value: *const c_char,
    value_size: usize,
    callback_error: *mut PJRT_CallbackError,
    user_arg: *mut c_void,
} last user_arg: *mut c_void);

pjrt_struct!(PJRT_Client_Create_Args {
    create_options: *const PJRT_NamedValue,
    num_options: usize,
    kv_get_callback: Option<PJRT_KeyValueGetCallback>,
    kv_get_user_arg: *mut c_void,
    kv_put_callback: Option<PJRT_KeyValuePutCallback>,
    kv_put_user_arg: *mut c_void,
    client: *mut PJRT_Client,
} last client: *mut PJRT_Client);
pjrt_struct!(PJRT_Client_Destroy_Args { client: *mut PJRT_Client } last client: *mut PJRT_Client);
pjrt_struct!(PJRT_Client_PlatformName_Args {
    client: *mut PJRT_Client,
    platform_name: *const c_char,
    platform_name_size: usize,
} last platform_name_size: usize);
pjrt_struct!(PJRT_Client_ProcessIndex_Args {
    client: *mut PJRT_Client,
    process_index: c_int,
} last process_index: c_int);
pjrt_struct!(PJRT_Client_PlatformVersion_Args {
    client: *mut PJRT_Client,
    platform_version: *const c_char,
    platform_version_size: usize,
} last platform_version_size: usize);
pjrt_struct!(PJRT_Client_AddressableDevices_Args {
    client: *mut PJRT_Client,
    addressable_devices: *const *mut PJRT_Device,
    num_addressable_devices: usize,
} last num_addressable_devices: usize);

#[repr(C)]
#[derive(Debug)]
pub struct PJRT_Program {
    pub struct_size: usize,
    pub extension_start: *mut c_void,
    pub code: *mut c_char,
    pub code_size: usize,
    pub format: *const c_char,
    pub format_size: usize,
}
// SAFETY: repr(C), starts with struct_size, pointers and integers only.
unsafe impl Plain for PJRT_Program {}
impl PJRT_Program {
    /// The header's `PJRT_Program_STRUCT_SIZE`.
    pub const fn STRUCT_SIZE() -> usize {
        std::mem::offset_of!(PJRT_Program, format_size) + 8
    }
}

pjrt_struct!(PJRT_Client_Compile_Args {
    client: *mut PJRT_Client,
    program: *const PJRT_Program,
    compile_options: *const c_char,
    compile_options_size: usize,
    executable: *mut PJRT_LoadedExecutable,
} last executable: *mut PJRT_LoadedExecutable);

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PJRT_Buffer_MemoryLayout_Tiled {
    pub struct_size: usize,
    pub extension_start: *mut c_void,
    pub minor_to_major: *const i64,
    pub minor_to_major_size: usize,
    pub tile_dims: *const i64,
    pub tile_dim_sizes: *const usize,
    pub num_tiles: usize,
}
// SAFETY: repr(C), starts with struct_size, pointers and integers only.
unsafe impl Plain for PJRT_Buffer_MemoryLayout_Tiled {}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PJRT_Buffer_MemoryLayout_Strides {
    pub struct_size: usize,
    pub extension_start: *mut c_void,
    pub byte_strides: *const i64,
    pub num_byte_strides: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union MemoryLayoutUnion {
    pub tiled: PJRT_Buffer_MemoryLayout_Tiled,
    pub strides: PJRT_Buffer_MemoryLayout_Strides,
}

impl std::fmt::Debug for MemoryLayoutUnion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryLayoutUnion(..)")
    }
}

pjrt_struct!(PJRT_Buffer_MemoryLayout {
    layout: MemoryLayoutUnion,
    type_: c_int,
} last type_: c_int);

pjrt_struct!(PJRT_Client_BufferFromHostBuffer_Args {
    client: *mut PJRT_Client,
    data: *const c_void,
    type_: c_int,
    dims: *const i64,
    num_dims: usize,
    byte_strides: *const i64,
    num_byte_strides: usize,
    host_buffer_semantics: c_int,
    device: *mut PJRT_Device,
    memory: *mut PJRT_Memory,
    device_layout: *mut PJRT_Buffer_MemoryLayout,
    done_with_host_buffer: *mut PJRT_Event,
    buffer: *mut PJRT_Buffer,
} last buffer: *mut PJRT_Buffer);

pjrt_struct!(PJRT_DeviceDescription_Id_Args {
    device_description: *mut PJRT_DeviceDescription,
    id: c_int,
} last id: c_int);
pjrt_struct!(PJRT_DeviceDescription_ProcessIndex_Args {
    device_description: *mut PJRT_DeviceDescription,
    process_index: c_int,
} last process_index: c_int);
pjrt_struct!(PJRT_DeviceDescription_Kind_Args {
    device_description: *mut PJRT_DeviceDescription,
    device_kind: *const c_char,
    device_kind_size: usize,
} last device_kind_size: usize);
pjrt_struct!(PJRT_Device_GetDescription_Args {
    device: *mut PJRT_Device,
    device_description: *mut PJRT_DeviceDescription,
} last device_description: *mut PJRT_DeviceDescription);

pjrt_struct!(PJRT_Executable_Destroy_Args { executable: *mut PJRT_Executable } last executable: *mut PJRT_Executable);
pjrt_struct!(PJRT_Executable_NumOutputs_Args {
    executable: *mut PJRT_Executable,
    num_outputs: usize,
} last num_outputs: usize);
pjrt_struct!(PJRT_LoadedExecutable_Destroy_Args {
    executable: *mut PJRT_LoadedExecutable,
} last executable: *mut PJRT_LoadedExecutable);
pjrt_struct!(PJRT_LoadedExecutable_GetExecutable_Args {
    loaded_executable: *mut PJRT_LoadedExecutable,
    executable: *mut PJRT_Executable,
} last executable: *mut PJRT_Executable);

pjrt_struct!(PJRT_ExecuteOptions {
    send_callbacks: *mut *mut c_void,
    recv_callbacks: *mut *mut c_void,
    num_send_ops: usize,
    num_recv_ops: usize,
    launch_id: c_int,
} last launch_id: c_int);

pjrt_struct!(PJRT_LoadedExecutable_Execute_Args {
    executable: *mut PJRT_LoadedExecutable,
    options: *mut PJRT_ExecuteOptions,
    argument_lists: *const *const *mut PJRT_Buffer,
    num_devices: usize,
    num_args: usize,
    output_lists: *const *mut *mut PJRT_Buffer,
    device_complete_events: *mut *mut PJRT_Event,
    execute_device: *mut PJRT_Device,
} last execute_device: *mut PJRT_Device);

pjrt_struct!(PJRT_Buffer_Destroy_Args { buffer: *mut PJRT_Buffer } last buffer: *mut PJRT_Buffer);
pjrt_struct!(PJRT_Buffer_ToHostBuffer_Args {
    src: *mut PJRT_Buffer,
    host_layout: *mut PJRT_Buffer_MemoryLayout,
    dst: *mut c_void,
    dst_size: usize,
    event: *mut PJRT_Event,
} last event: *mut PJRT_Event);
pjrt_struct!(PJRT_Buffer_ReadyEvent_Args {
    buffer: *mut PJRT_Buffer,
    event: *mut PJRT_Event,
} last event: *mut PJRT_Event);

/// An argument struct followed by [`TAIL_BYTES`] zero bytes; `struct_size` covers both.
#[repr(C)]
#[derive(Debug)]
pub struct Args<T: Plain> {
    /// The struct the header describes.
    pub a: T,
    tail: [u64; TAIL_BYTES / 8],
}

impl<T: Plain> Args<T> {
    /// All zeros, with `struct_size` set to the whole size.
    pub fn new() -> Self {
        // SAFETY: `T: Plain` is valid when zeroed, and so is the u64 tail.
        let mut s: Self = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<Self>();
        // SAFETY: `Plain` types are repr(C) and start with a usize `struct_size`; `Args` is
        // repr(C) with `a` first, so the struct's first word is `struct_size`.
        unsafe { *(&mut s as *mut Self as *mut usize) = size };
        s
    }
    /// Pointer for the C call.
    pub fn ptr(&mut self) -> *mut T {
        &mut self.a
    }
}

impl<T: Plain> Default for Args<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A void-returning slot (`PJRT_Error_Destroy`, `PJRT_Error_Message`).
pub type VoidFn<A> = Option<unsafe extern "C" fn(args: *mut A)>;
/// An error-returning slot.
pub type ErrFn<A> = Option<unsafe extern "C" fn(args: *mut A) -> *mut PJRT_Error>;
/// A slot this crate does not call.
pub type Unused = Option<unsafe extern "C" fn()>;

/// The prefix of `PJRT_Api` up to `PJRT_Buffer_ReadyEvent` (slot 72), in the header's order.
#[repr(C)]
#[derive(Debug)]
pub struct PJRT_Api {
    pub struct_size: usize,
    pub extension_start: *mut c_void,
    pub pjrt_api_version: PJRT_Api_Version,
    // 0..=2
    pub PJRT_Error_Destroy: VoidFn<PJRT_Error_Destroy_Args>,
    pub PJRT_Error_Message: VoidFn<PJRT_Error_Message_Args>,
    pub PJRT_Error_GetCode: ErrFn<PJRT_Error_GetCode_Args>,
    // 3..=4
    pub PJRT_Plugin_Initialize: ErrFn<PJRT_Plugin_Initialize_Args>,
    pub PJRT_Plugin_Attributes: Unused,
    // 5..=9
    pub PJRT_Event_Destroy: ErrFn<PJRT_Event_Destroy_Args>,
    pub PJRT_Event_IsReady: ErrFn<PJRT_Event_IsReady_Args>,
    pub PJRT_Event_Error: ErrFn<PJRT_Event_Error_Args>,
    pub PJRT_Event_Await: ErrFn<PJRT_Event_Await_Args>,
    pub PJRT_Event_OnReady: Unused,
    // 10..=22
    pub PJRT_Client_Create: ErrFn<PJRT_Client_Create_Args>,
    pub PJRT_Client_Destroy: ErrFn<PJRT_Client_Destroy_Args>,
    pub PJRT_Client_PlatformName: ErrFn<PJRT_Client_PlatformName_Args>,
    pub PJRT_Client_ProcessIndex: ErrFn<PJRT_Client_ProcessIndex_Args>,
    pub PJRT_Client_PlatformVersion: ErrFn<PJRT_Client_PlatformVersion_Args>,
    pub PJRT_Client_Devices: Unused,
    pub PJRT_Client_AddressableDevices: ErrFn<PJRT_Client_AddressableDevices_Args>,
    pub PJRT_Client_LookupDevice: Unused,
    pub PJRT_Client_LookupAddressableDevice: Unused,
    pub PJRT_Client_AddressableMemories: Unused,
    pub PJRT_Client_Compile: ErrFn<PJRT_Client_Compile_Args>,
    pub PJRT_Client_DefaultDeviceAssignment: Unused,
    pub PJRT_Client_BufferFromHostBuffer: ErrFn<PJRT_Client_BufferFromHostBuffer_Args>,
    // 23..=28
    pub PJRT_DeviceDescription_Id: ErrFn<PJRT_DeviceDescription_Id_Args>,
    pub PJRT_DeviceDescription_ProcessIndex: ErrFn<PJRT_DeviceDescription_ProcessIndex_Args>,
    pub PJRT_DeviceDescription_Attributes: Unused,
    pub PJRT_DeviceDescription_Kind: ErrFn<PJRT_DeviceDescription_Kind_Args>,
    pub PJRT_DeviceDescription_DebugString: Unused,
    pub PJRT_DeviceDescription_ToString: Unused,
    // 29..=34
    pub PJRT_Device_GetDescription: ErrFn<PJRT_Device_GetDescription_Args>,
    pub PJRT_Device_IsAddressable: Unused,
    pub PJRT_Device_LocalHardwareId: Unused,
    pub PJRT_Device_AddressableMemories: Unused,
    pub PJRT_Device_DefaultMemory: Unused,
    pub PJRT_Device_MemoryStats: Unused,
    // 35..=39
    pub PJRT_Memory_Id: Unused,
    pub PJRT_Memory_Kind: Unused,
    pub PJRT_Memory_DebugString: Unused,
    pub PJRT_Memory_ToString: Unused,
    pub PJRT_Memory_AddressableByDevices: Unused,
    // 40..=49
    pub PJRT_Executable_Destroy: ErrFn<PJRT_Executable_Destroy_Args>,
    pub PJRT_Executable_Name: Unused,
    pub PJRT_Executable_NumReplicas: Unused,
    pub PJRT_Executable_NumPartitions: Unused,
    pub PJRT_Executable_NumOutputs: ErrFn<PJRT_Executable_NumOutputs_Args>,
    pub PJRT_Executable_SizeOfGeneratedCodeInBytes: Unused,
    pub PJRT_Executable_GetCostAnalysis: Unused,
    pub PJRT_Executable_OutputMemoryKinds: Unused,
    pub PJRT_Executable_OptimizedProgram: Unused,
    pub PJRT_Executable_Serialize: Unused,
    // 50..=57
    pub PJRT_LoadedExecutable_Destroy: ErrFn<PJRT_LoadedExecutable_Destroy_Args>,
    pub PJRT_LoadedExecutable_GetExecutable: ErrFn<PJRT_LoadedExecutable_GetExecutable_Args>,
    pub PJRT_LoadedExecutable_AddressableDevices: Unused,
    pub PJRT_LoadedExecutable_Delete: Unused,
    pub PJRT_LoadedExecutable_IsDeleted: Unused,
    pub PJRT_LoadedExecutable_Execute: ErrFn<PJRT_LoadedExecutable_Execute_Args>,
    pub PJRT_Executable_DeserializeAndLoad: Unused,
    pub PJRT_LoadedExecutable_Fingerprint: Unused,
    // 58..=72
    pub PJRT_Buffer_Destroy: ErrFn<PJRT_Buffer_Destroy_Args>,
    pub PJRT_Buffer_ElementType: Unused,
    pub PJRT_Buffer_Dimensions: Unused,
    pub PJRT_Buffer_UnpaddedDimensions: Unused,
    pub PJRT_Buffer_DynamicDimensionIndices: Unused,
    pub PJRT_Buffer_GetMemoryLayout: Unused,
    pub PJRT_Buffer_OnDeviceSizeInBytes: Unused,
    pub PJRT_Buffer_Device: Unused,
    pub PJRT_Buffer_Memory: Unused,
    pub PJRT_Buffer_Delete: Unused,
    pub PJRT_Buffer_IsDeleted: Unused,
    pub PJRT_Buffer_CopyToDevice: Unused,
    pub PJRT_Buffer_ToHostBuffer: ErrFn<PJRT_Buffer_ToHostBuffer_Args>,
    pub PJRT_Buffer_IsOnCpu: Unused,
    pub PJRT_Buffer_ReadyEvent: ErrFn<PJRT_Buffer_ReadyEvent_Args>,
}

/// `GetPjrtApi`, the one symbol a plugin exports.
pub type GetPjrtApi = unsafe extern "C" fn() -> *const PJRT_Api;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn transcription_matches_the_header_on_lp64() {
        // PJRT_Api: struct_size, extension_start, a 24-byte version, then slot 0 at 40.
        assert_eq!(size_of::<PJRT_Api_Version>(), 24);
        assert_eq!(offset_of!(PJRT_Api, PJRT_Error_Destroy), 40);
        assert_eq!(offset_of!(PJRT_Api, PJRT_Client_Create), 40 + 10 * 8);
        assert_eq!(offset_of!(PJRT_Api, PJRT_Client_Compile), 40 + 20 * 8);
        assert_eq!(
            offset_of!(PJRT_Api, PJRT_Client_BufferFromHostBuffer),
            40 + 22 * 8
        );
        assert_eq!(
            offset_of!(PJRT_Api, PJRT_LoadedExecutable_Execute),
            40 + 55 * 8
        );
        assert_eq!(offset_of!(PJRT_Api, PJRT_Buffer_Destroy), 40 + 58 * 8);
        assert_eq!(offset_of!(PJRT_Api, PJRT_Buffer_ToHostBuffer), 40 + 70 * 8);
        assert_eq!(size_of::<PJRT_Api>(), 40 + 73 * 8);
        // Argument structs (sizes as PJRT_STRUCT_SIZE computes them).
        assert_eq!(PJRT_Client_Create_Args::STRUCT_SIZE(), 72);
        assert_eq!(PJRT_NamedValue::STRUCT_SIZE(), 56);
        assert_eq!(offset_of!(PJRT_NamedValue, value), 40);
        assert_eq!(PJRT_Client_BufferFromHostBuffer_Args::STRUCT_SIZE(), 120);
        assert_eq!(offset_of!(PJRT_Client_BufferFromHostBuffer_Args, dims), 40);
        assert_eq!(
            offset_of!(PJRT_Client_BufferFromHostBuffer_Args, device),
            80
        );
        assert_eq!(PJRT_Buffer_MemoryLayout::STRUCT_SIZE(), 76);
        assert_eq!(PJRT_Buffer_ToHostBuffer_Args::STRUCT_SIZE(), 56);
        assert_eq!(PJRT_ExecuteOptions::STRUCT_SIZE(), 52);
        assert_eq!(PJRT_LoadedExecutable_Execute_Args::STRUCT_SIZE(), 80);
        assert_eq!(PJRT_Client_Compile_Args::STRUCT_SIZE(), 56);
        assert_eq!(PJRT_Program::STRUCT_SIZE(), 48);
        assert_eq!(PJRT_KeyValueGetCallback_Args::STRUCT_SIZE(), 80);
        assert_eq!(PJRT_KeyValuePutCallback_Args::STRUCT_SIZE(), 64);
        assert_eq!(PJRT_Event_IsReady_Args::STRUCT_SIZE(), 25);
        assert_eq!(PJRT_Error_Message_Args::STRUCT_SIZE(), 40);
    }

    #[test]
    fn args_are_zeroed_and_sized_with_the_tail() {
        let mut a = Args::<PJRT_ExecuteOptions>::new();
        assert_eq!(a.a.struct_size, size_of::<Args<PJRT_ExecuteOptions>>());
        assert!(a.a.struct_size >= PJRT_ExecuteOptions::STRUCT_SIZE() + TAIL_BYTES);
        assert!(a.a.send_callbacks.is_null());
        assert_eq!(a.a.launch_id, 0);
        assert!(a.tail.iter().all(|w| *w == 0));
        assert_eq!(a.ptr() as usize, &a as *const _ as usize);
    }
}
