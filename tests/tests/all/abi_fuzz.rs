//! The proxy-wasm ABI from the guest side: modules generated from a seed import every host
//! function `meshroute run` provides and call them, from every callback, with arbitrary
//! pointers, lengths and enum values (inside, at the edge of and far outside linear memory),
//! and with an allocator that answers out-of-bounds addresses. The host must refuse what it
//! cannot do with a status and stay usable: never panic, never
//! hang, never answer with anything but one of the ABI's statuses (the guest checks each
//! answer and traps on any other).
//!
//! `MESHROUTE_ABI_FUZZ_CASES` (default 600) sets the number of modules;
//! `MESHROUTE_ABI_FUZZ_SEED` another sequence. `make fuzz` runs many more.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, DataSection, EntityType, ExportKind, ExportSection,
    Function, FunctionSection, ImportSection, Instruction, MemorySection, MemoryType, Module,
    TypeSection, ValType,
};

use meshroute_core::engine::{Rng as _, SplitMix64};
use meshroute_wasm_host::abi::{CallTarget, Stream};
use meshroute_wasm_host::vm::Plugin;

/// Every host function, with its number of i32 parameters; `true`: one more, an i64 (the
/// metric value). All return an i32 status.
const IMPORTS: &[(&str, usize, bool)] = &[
    ("proxy_get_header_map_pairs", 3, false),
    ("proxy_get_header_map_size", 2, false),
    ("proxy_set_header_map_pairs", 3, false),
    ("proxy_get_header_map_value", 5, false),
    ("proxy_add_header_map_value", 5, false),
    ("proxy_replace_header_map_value", 5, false),
    ("proxy_remove_header_map_value", 3, false),
    ("proxy_get_buffer_bytes", 5, false),
    ("proxy_get_buffer_status", 3, false),
    ("proxy_set_buffer_bytes", 5, false),
    ("proxy_get_property", 4, false),
    ("proxy_set_property", 4, false),
    ("proxy_continue_stream", 1, false),
    ("proxy_close_stream", 1, false),
    ("proxy_send_local_response", 8, false),
    ("proxy_http_call", 10, false),
    ("proxy_log", 3, false),
    ("proxy_get_log_level", 1, false),
    ("proxy_get_current_time_nanoseconds", 1, false),
    ("proxy_set_tick_period_milliseconds", 1, false),
    ("proxy_set_effective_context", 1, false),
    ("proxy_done", 0, false),
    ("proxy_get_shared_data", 5, false),
    ("proxy_set_shared_data", 5, false),
    ("proxy_register_shared_queue", 3, false),
    ("proxy_resolve_shared_queue", 5, false),
    ("proxy_enqueue_shared_queue", 3, false),
    ("proxy_dequeue_shared_queue", 3, false),
    ("proxy_define_metric", 4, false),
    ("proxy_increment_metric", 1, true),
    ("proxy_record_metric", 1, true),
    ("proxy_get_metric", 2, false),
    ("proxy_grpc_call", 12, false),
    ("proxy_grpc_stream", 9, false),
    ("proxy_grpc_send", 4, false),
    ("proxy_grpc_cancel", 1, false),
    ("proxy_grpc_close", 1, false),
    ("proxy_get_status", 3, false),
    ("proxy_call_foreign_function", 6, false),
];

/// The guest's memory: one page, so that "just past the end" is easy to hit.
const PAGE: i64 = 65_536;

/// Where the data segment puts plausible arguments: a header map, names, a path.
const DATA_AT: i32 = 1_024;

/// The callbacks a generated module exports: name, parameter count, whether it returns.
const CALLBACKS: &[(&str, usize, bool)] = &[
    ("proxy_on_context_create", 2, false),
    ("proxy_on_vm_start", 2, true),
    ("proxy_on_configure", 2, true),
    ("proxy_on_request_headers", 3, true),
    ("proxy_on_request_body", 3, true),
    ("proxy_on_response_headers", 3, true),
    ("proxy_on_tick", 1, false),
    ("proxy_on_log", 1, false),
    ("proxy_on_done", 1, true),
    ("proxy_on_delete", 1, false),
];

const NO_LOCALS: [(u32, ValType); 0] = [];

/// The modules' draws, from the engine's seeded SplitMix64.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// An argument: small values and enum-sized numbers, addresses inside the data, at the
    /// memory's edge and far past it, huge and negative lengths.
    fn arg(&mut self) -> i32 {
        let edge = PAGE as i32;
        match self.below(12) {
            0 => 0,
            1 => self.below(10) as i32,
            2 => DATA_AT + self.below(64) as i32,
            3 => edge - self.below(16) as i32,
            4 => edge + self.below(16) as i32,
            5 => -1,
            6 => i32::MIN,
            7 => i32::MAX - self.below(4) as i32,
            8 => self.below(PAGE as u64) as i32,
            9 => 16 + self.below(48) as i32,
            10 => 4_096 * self.below(20) as i32,
            _ => self.next() as i32,
        }
    }
}

/// proxy-wasm's statuses are 0 (Ok) to 12 (Unimplemented).
const STATUSES: i32 = 13;

/// A module whose every callback makes `calls` random host calls, each answer checked to be
/// a status, and whose allocator answers what the seed says.
fn module(rng: &mut Rng, calls: usize, canary: bool) -> Vec<u8> {
    let mut types = TypeSection::new();
    let mut imports = ImportSection::new();
    for (i, (name, n, wide)) in IMPORTS.iter().enumerate() {
        let mut params = vec![ValType::I32; *n];
        if *wide {
            params.push(ValType::I64);
        }
        types.ty().function(params, [ValType::I32]);
        imports.import("env", name, EntityType::Function(i as u32));
    }
    let base = IMPORTS.len() as u32;
    // Types for the exports: the ABI marker, the allocator, then each callback.
    types.ty().function([], []);
    types.ty().function([ValType::I32], [ValType::I32]);
    for (_, n, returns) in CALLBACKS {
        let results: &[ValType] = if *returns { &[ValType::I32] } else { &[] };
        types
            .ty()
            .function(vec![ValType::I32; *n], results.iter().copied());
    }
    let mut functions = FunctionSection::new();
    let mut exports = ExportSection::new();
    let mut code = CodeSection::new();
    exports.export("memory", ExportKind::Memory, 0);
    functions.function(base);
    exports.export(
        "proxy_abi_version_0_2_1",
        ExportKind::Func,
        IMPORTS.len() as u32,
    );
    let mut marker = Function::new(NO_LOCALS);
    marker.instruction(&Instruction::End);
    code.function(&marker);
    // The allocator: mostly a fixed scratch area, sometimes an address the guest does not
    // have, which the host must refuse to write through.
    functions.function(base + 1);
    exports.export(
        "proxy_on_memory_allocate",
        ExportKind::Func,
        IMPORTS.len() as u32 + 1,
    );
    let scratch = match rng.below(4) {
        0 => rng.arg(),
        _ => 8_192,
    };
    let mut alloc = Function::new(NO_LOCALS);
    alloc.instruction(&Instruction::I32Const(scratch));
    alloc.instruction(&Instruction::End);
    code.function(&alloc);
    for (c, (name, _, returns)) in CALLBACKS.iter().enumerate() {
        let index = IMPORTS.len() as u32 + 2 + c as u32;
        functions.function(base + 2 + c as u32);
        exports.export(name, ExportKind::Func, index);
        let mut f = Function::new(NO_LOCALS);
        for _ in 0..calls {
            let which = rng.below(IMPORTS.len() as u64) as usize;
            let (_, n, wide) = IMPORTS[which];
            for _ in 0..n {
                f.instruction(&Instruction::I32Const(rng.arg()));
            }
            if wide {
                f.instruction(&Instruction::I64Const(rng.next() as i64));
            }
            f.instruction(&Instruction::Call(which as u32));
            // The answer must be one of the ABI's statuses; anything else traps. (The
            // inverted check of the canary traps on every valid status.)
            f.instruction(&Instruction::I32Const(STATUSES));
            f.instruction(&if canary {
                Instruction::I32LtU
            } else {
                Instruction::I32GeU
            });
            f.instruction(&Instruction::If(BlockType::Empty));
            f.instruction(&Instruction::Unreachable);
            f.instruction(&Instruction::End);
        }
        if *returns {
            // vm_start and configure succeed (so the streams run); a stream continues or
            // pauses as the seed says.
            let value = if c <= 2 { 1 } else { rng.below(2) as i32 };
            f.instruction(&Instruction::I32Const(value));
        }
        f.instruction(&Instruction::End);
        code.function(&f);
    }
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 1,
        maximum: Some(2),
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    // Plausible arguments for calls that land on them: a serialized header map, a
    // property path, a cluster name.
    let mut data = DataSection::new();
    let mut bytes = meshroute_wasm_host::abi::serialize_pairs(&[
        (":path".into(), "/x".into()),
        ("x-a".into(), "1".into()),
    ]);
    bytes.extend_from_slice(b"request\0path\0outbound|80||web\0");
    data.active(0, &ConstExpr::i32_const(DATA_AT), bytes);
    let mut m = Module::new();
    m.section(&types)
        .section(&imports)
        .section(&functions)
        .section(&memories)
        .section(&exports)
        .section(&code)
        .section(&data);
    m.finish()
}

/// What happened to one module: how far it got before the host failed it, if it did.
#[derive(Debug, Default)]
struct Outcome {
    started: bool,
    trapped: bool,
}

fn run_one(plugin: &Plugin) -> Outcome {
    let known: Arc<meshroute_wasm_host::abi::ClusterCheck> =
        Arc::new(|_: &str, _: &[(String, String)]| CallTarget::UnknownCluster);
    let mut out = Outcome::default();
    let Ok(mut vm) = plugin.start("fuzz", b"{}", known) else {
        return out;
    };
    out.started = true;
    let headers = vec![
        (":method".to_owned(), "GET".to_owned()),
        (":path".to_owned(), "/x".to_owned()),
        (":authority".to_owned(), "web".to_owned()),
        ("x-a".to_owned(), "1".to_owned()),
    ];
    let Ok(id) = vm.open_stream(Stream::new(headers)) else {
        out.trapped = true;
        return out;
    };
    let steps = [
        vm.on_request_headers(id, false).map(drop),
        vm.on_request_body(id, true).map(drop),
        vm.on_response_headers(id, true).map(drop),
        vm.on_tick(),
        vm.close_stream(id),
    ];
    out.trapped = steps.iter().any(Result::is_err);
    // A failed instance stays failed: it is not run again.
    if out.trapped {
        assert!(
            vm.failed.load(std::sync::atomic::Ordering::Relaxed),
            "a trap marks the instance failed"
        );
    }
    out
}

#[test]
fn generated_guests_calling_every_import_with_arbitrary_arguments_are_contained() {
    let cases: u64 = meshroute_tests::env_number("MESHROUTE_ABI_FUZZ_CASES", 600);
    let seed: u64 = meshroute_tests::env_number("MESHROUTE_ABI_FUZZ_SEED", 0x0061_6269);
    let dir = std::env::temp_dir().join(format!("meshroute-abi-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut started, mut trapped, mut clean) = (0u64, 0u64, 0u64);
    let began = Instant::now();
    for case in 0..cases {
        let mut rng = Rng(SplitMix64(seed ^ case.wrapping_mul(0x2545_f491_4f6c_dd1d)));
        let calls = 1 + rng.below(24) as usize;
        let bytes = module(&mut rng, calls, false);
        let path = dir.join("guest.wasm");
        std::fs::write(&path, &bytes).unwrap();
        let plugin = Plugin::load(&path, None)
            .unwrap_or_else(|e| panic!("case {case} (seed {seed}): the module links: {e}"));
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_one(&plugin)))
            .unwrap_or_else(|p| {
                std::fs::write(dir.join(format!("panic-{case}.wasm")), &bytes).unwrap();
                panic!(
                    "case {case} (seed {seed}): the host panicked ({:?}); module kept in {}",
                    p.downcast_ref::<String>(),
                    dir.display()
                )
            });
        // Each callback has a CPU budget; a module of two dozen calls is far inside it.
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "case {case} (seed {seed}) took {:?}",
            t.elapsed()
        );
        started += u64::from(outcome.started);
        trapped += u64::from(outcome.trapped);
        clean += u64::from(outcome.started && !outcome.trapped);
    }
    // The check itself can fail: inverted, it traps at the first call of any module.
    let canary = module(&mut Rng(SplitMix64(seed)), 4, true);
    let path = dir.join("canary.wasm");
    std::fs::write(&path, &canary).unwrap();
    let outcome = run_one(&Plugin::load(&path, None).unwrap());
    assert!(
        !outcome.started,
        "the inverted check traps while the instance starts"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let summary = format!(
        "abi fuzz: {cases} modules in {:?}: {started} started, {trapped} failed by a trap, {clean} ran every callback\n",
        began.elapsed()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), summary.as_bytes());
    // Every module starts (the configure callbacks answer true whatever their calls did)
    // and every host call answers with a status.
    assert_eq!((started, trapped), (cases, 0), "{summary}");
}
