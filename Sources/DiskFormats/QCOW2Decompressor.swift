import CairnCore
import CZlib
import CZstd
import Synchronization

/// Inflates qcow2 compressed clusters (deflate or zstd) into exactly one cluster.
///
/// A compressed cluster's stored length is only known to 512-byte precision, so input may
/// hold trailing bytes after the stream; decompression succeeds when it fills the cluster,
/// as QEMU's does. zstd contexts are pooled (creating one costs more than a cluster's worth
/// of work); deflate streams are cheap to set up per call.
final class QCOW2Decompressor: Sendable {
    let type: QCOW2Header.CompressionType
    private let pool = Mutex<[ZstdContext]>([])
    private static let maxPooled = 8
    /// No qcow2 writer needs a window beyond the 2 MiB cluster; cap memory for hostile frames.
    private static let zstdWindowLogMax: Int32 = 24

    init(type: QCOW2Header.CompressionType) {
        self.type = type
    }

    /// Decompresses `input` into `output` (one cluster). Returns false when the stream is
    /// invalid or does not produce exactly `output.count` bytes.
    func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        switch type {
        case .deflate: inflateRaw(input, into: output)
        case .zstd: decompressZstd(input, into: output)
        }
    }

    private func inflateRaw(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress,
              input.count <= Int(UInt32.max), output.count <= Int(UInt32.max) else { return false }
        var stream = z_stream()
        guard inflateInit2_(&stream, QCOW2.deflateWindowBits, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            return false
        }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        stream.next_out = outBase.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(output.count)
        let status = inflate(&stream, Z_FINISH)
        // Z_BUF_ERROR with a full output means the cluster is complete and input remains
        // (sector padding): accepted, like QEMU.
        return (status == Z_STREAM_END || status == Z_BUF_ERROR) && stream.avail_out == 0
    }

    private func decompressZstd(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let context = takeContext() else { return false }
        defer { giveBack(context) }
        let dctx = context.dctx
        guard ZSTD_isError(ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only)) == 0 else { return false }
        var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuffer = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        while outBuffer.pos < outBuffer.size {
            let lastIn = inBuffer.pos, lastOut = outBuffer.pos
            let status = ZSTD_decompressStream(dctx, &outBuffer, &inBuffer)
            if ZSTD_isError(status) != 0 { return false }
            // No progress: the input ended (or only padding is left) before the cluster filled.
            if inBuffer.pos == lastIn && outBuffer.pos == lastOut { return false }
        }
        return outBuffer.pos == output.count
    }

    private func takeContext() -> ZstdContext? {
        if let pooled = pool.withLock({ $0.popLast() }) { return pooled }
        return ZstdContext(windowLogMax: Self.zstdWindowLogMax)
    }

    private func giveBack(_ context: ZstdContext) {
        pool.withLock { contexts in
            if contexts.count < Self.maxPooled { contexts.append(context) }
        }
    }
}

/// Owns one zstd decompression context; used by one thread at a time (taken from a pool).
private final class ZstdContext: @unchecked Sendable {
    // @unchecked: the pointer is only used by the thread that took the context from the pool.
    let dctx: OpaquePointer

    init?(windowLogMax: Int32) {
        guard let ctx = ZSTD_createDCtx() else { return nil }
        _ = ZSTD_DCtx_setParameter(ctx, ZSTD_d_windowLogMax, windowLogMax)
        dctx = ctx
    }

    deinit { ZSTD_freeDCtx(dctx) }
}
