import CairnCore
import NIOCore

/// Builds whole replies (simple or every structured chunk of one request) into one buffer, so
/// a reply is always written at once and replies of concurrent requests never interleave
/// inside a chunk. The `perform*` functions do the block I/O; they run on worker threads.
enum NBDReplies {
    /// Longest error message sent in a structured error chunk (the protocol caps strings at 4096).
    static let maxMessageBytes = 1024

    static func simple(_ handle: UInt64, error: UInt32, allocator: ByteBufferAllocator) -> ByteBuffer {
        var b = allocator.buffer(capacity: 16)
        writeSimpleHeader(&b, handle: handle, error: error)
        return b
    }

    /// An error reply: a structured error chunk (with `message`) when structured replies are on,
    /// otherwise a simple reply.
    static func error(_ handle: UInt64, error: UInt32, message: String, structured: Bool, allocator: ByteBufferAllocator) -> ByteBuffer {
        guard structured else { return simple(handle, error: error, allocator: allocator) }
        let text = truncated(message)
        var b = allocator.buffer(capacity: 26 + text.count)
        writeChunkHeader(&b, flags: NBDReplyType.flagDone, type: NBDReplyType.error, handle: handle, length: UInt32(6 + text.count))
        b.writeInteger(error)
        b.writeInteger(UInt16(text.count))
        b.writeBytes(text)
        return b
    }

    static func writeSimpleHeader(_ b: inout ByteBuffer, handle: UInt64, error: UInt32) {
        b.writeInteger(NBDMagic.simpleReply)
        b.writeInteger(error)
        b.writeInteger(handle)
    }

    static func writeChunkHeader(_ b: inout ByteBuffer, flags: UInt16, type: UInt16, handle: UInt64, length: UInt32) {
        b.writeInteger(NBDMagic.structuredReply)
        b.writeInteger(flags)
        b.writeInteger(type)
        b.writeInteger(handle)
        b.writeInteger(length)
    }

    /// The NBD error value and message for an error thrown by a source or device.
    static func classify(_ error: any Error) -> (UInt32, String) {
        if let e = error as? CairnError {
            return (e.code == .noSpace ? NBDError.noSpace : NBDError.io, e.description)
        }
        return (NBDError.io, String(describing: error))
    }

    private static func truncated(_ message: String) -> [UInt8] {
        var bytes = Array(message.utf8.filter { $0 != 0 })
        if bytes.count > maxMessageBytes {
            bytes.removeLast(bytes.count - maxMessageBytes)
            // Do not end inside a multi-byte UTF-8 sequence.
            while let last = bytes.last, last & 0xC0 == 0x80 { bytes.removeLast() }
            if let last = bytes.last, last >= 0xC0 { bytes.removeLast() }
        }
        return bytes
    }

    // MARK: - Reads

    /// One piece of a read: bytes to send, or a range known to read as zeros.
    struct Segment: Equatable {
        var offset: UInt64
        var length: UInt64
        var isHole: Bool
    }

    /// Splits `range` into data and hole segments following `source.extents`, tolerating a
    /// map with gaps or overlaps (gaps are read as data). A failing map reads everything.
    static func segments(of source: any BlockSource, in range: Range<UInt64>) -> [Segment] {
        guard !range.isEmpty else { return [] }
        let extents = (try? source.extents(in: range)) ?? []
        var out: [Segment] = []
        var cursor = range.lowerBound
        func append(_ end: UInt64, hole: Bool) {
            guard end > cursor else { return }
            if let last = out.last, last.isHole == hole {
                out[out.count - 1].length += end - cursor
            } else {
                out.append(Segment(offset: cursor, length: end - cursor, isHole: hole))
            }
            cursor = end
        }
        for e in extents where e.end > cursor && e.offset < range.upperBound {
            if e.offset > cursor { append(e.offset, hole: false) }
            append(min(e.end, range.upperBound), hole: !e.kind.needsRead)
        }
        append(range.upperBound, hole: false)
        return out
    }

    /// Reads `[offset, offset + length)` (already validated) and builds the whole reply.
    /// Structured: hole chunks for zero/unallocated extents unless `dontFragment`, data chunks
    /// for the rest, the last chunk flagged done. On a source error the reply is an error.
    static func performRead(_ request: NBDRequest, source: any BlockSource, structured: Bool,
                            allocator: ByteBufferAllocator) -> ByteBuffer {
        let offset = request.offset, length = Int(request.length)
        do {
            if !structured {
                var b = allocator.buffer(capacity: 16 + length)
                writeSimpleHeader(&b, handle: request.handle, error: NBDError.ok)
                try readInto(&b, source: source, offset: offset, count: length)
                return b
            }
            if length == 0 {
                var b = allocator.buffer(capacity: 20)
                writeChunkHeader(&b, flags: NBDReplyType.flagDone, type: NBDReplyType.none, handle: request.handle, length: 0)
                return b
            }
            let range = offset..<offset + UInt64(length)
            let dontFragment = request.flags & NBDCommandFlag.dontFragment != 0
            let parts = dontFragment ? [Segment(offset: offset, length: UInt64(length), isHole: false)] : segments(of: source, in: range)
            let dataBytes = parts.reduce(0) { $0 + ($1.isHole ? 0 : Int($1.length)) }
            var b = allocator.buffer(capacity: dataBytes + parts.count * 32)
            for (i, part) in parts.enumerated() {
                let flags = i == parts.count - 1 ? NBDReplyType.flagDone : 0
                if part.isHole {
                    writeChunkHeader(&b, flags: flags, type: NBDReplyType.offsetHole, handle: request.handle, length: 12)
                    b.writeInteger(part.offset)
                    b.writeInteger(UInt32(part.length))
                } else {
                    writeChunkHeader(&b, flags: flags, type: NBDReplyType.offsetData, handle: request.handle, length: UInt32(8 + part.length))
                    b.writeInteger(part.offset)
                    if dontFragment {
                        try readMerged(&b, source: source, range: range)
                    } else {
                        try readInto(&b, source: source, offset: part.offset, count: Int(part.length))
                    }
                }
            }
            return b
        } catch {
            let (code, message) = classify(error)
            return self.error(request.handle, error: code, message: message, structured: structured, allocator: allocator)
        }
    }

    private static func readInto(_ b: inout ByteBuffer, source: any BlockSource, offset: UInt64, count: Int) throws {
        guard count > 0 else { return }
        try b.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { ptr in
            try source.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[0..<count]), at: offset)
            return count
        }
    }

    /// Reads a range as one run of bytes, writing zeros for holes instead of reading them.
    private static func readMerged(_ b: inout ByteBuffer, source: any BlockSource, range: Range<UInt64>) throws {
        for part in segments(of: source, in: range) {
            if part.isHole {
                b.writeRepeatingByte(0, count: Int(part.length))
            } else {
                try readInto(&b, source: source, offset: part.offset, count: Int(part.length))
            }
        }
    }

    // MARK: - Block status

    /// The `base:allocation` reply for `[offset, offset + length)` (validated, length > 0):
    /// one descriptor per run of equal status, at most `maxDescriptors` (1 with REQ_ONE).
    static func performBlockStatus(_ request: NBDRequest, source: any BlockSource, maxDescriptors: Int,
                                   allocator: ByteBufferAllocator) -> ByteBuffer {
        let range = request.offset..<request.offset + UInt64(request.length)
        do {
            let extents = try source.extents(in: range)
            var descriptors: [(length: UInt64, flags: UInt32)] = []
            var cursor = range.lowerBound
            let limit = request.flags & NBDCommandFlag.reqOne != 0 ? 1 : max(1, maxDescriptors)
            func add(_ end: UInt64, _ flags: UInt32) {
                guard end > cursor else { return }
                if let last = descriptors.last, last.flags == flags {
                    descriptors[descriptors.count - 1].length += end - cursor
                } else {
                    descriptors.append((end - cursor, flags))
                }
                cursor = end
            }
            for e in extents where e.end > cursor && e.offset < range.upperBound {
                if e.offset > cursor { add(e.offset, 0) }
                add(min(e.end, range.upperBound), e.kind.needsRead ? 0 : NBDAllocation.hole | NBDAllocation.zero)
                if descriptors.count > limit { break }
            }
            if descriptors.count <= limit { add(range.upperBound, 0) }
            if descriptors.count > limit { descriptors.removeLast(descriptors.count - limit) }
            var b = allocator.buffer(capacity: 24 + descriptors.count * 8)
            writeChunkHeader(&b, flags: NBDReplyType.flagDone, type: NBDReplyType.blockStatus, handle: request.handle,
                             length: UInt32(4 + descriptors.count * 8))
            b.writeInteger(NBDAllocation.contextID)
            for d in descriptors {
                b.writeInteger(UInt32(d.length))
                b.writeInteger(d.flags)
            }
            return b
        } catch {
            let (code, message) = classify(error)
            return self.error(request.handle, error: code, message: message, structured: true, allocator: allocator)
        }
    }

    // MARK: - Writes

    /// Runs a write-side command on a writable device; a simple reply on success.
    static func performWrite(_ request: NBDRequest, payload: ByteBuffer?, device: any NBDWritableDevice, structured: Bool,
                             allocator: ByteBufferAllocator) -> ByteBuffer {
        do {
            switch request.type {
            case NBDCommand.write:
                if let payload {
                    try payload.withUnsafeReadableBytes { try device.write($0, at: request.offset) }
                }
            case NBDCommand.writeZeroes:
                try device.writeZeroes(at: request.offset, length: UInt64(request.length))
            case NBDCommand.trim:
                try device.trim(at: request.offset, length: UInt64(request.length))
            default:
                break
            }
            if request.type == NBDCommand.flush || request.flags & NBDCommandFlag.fua != 0 {
                try device.flush()
            }
            return simple(request.handle, error: NBDError.ok, allocator: allocator)
        } catch {
            let (code, message) = classify(error)
            return self.error(request.handle, error: code, message: message, structured: structured, allocator: allocator)
        }
    }
}
