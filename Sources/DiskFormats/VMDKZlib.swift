import CZlib

/// zlib (RFC 1950) streams for stream-optimized grains: each compressed grain is one
/// complete zlib stream of one grain of data.
enum VMDKZlib {
    /// Inflates `input` into `output`. Returns the number of bytes produced, or nil when the
    /// stream is invalid, truncated, or would produce more than `output.count` bytes. Bytes
    /// after the end of the stream (sector padding) are ignored.
    static func inflateStream(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress,
              input.count <= Int(UInt32.max), output.count <= Int(UInt32.max) else { return nil }
        var stream = z_stream()
        guard inflateInit_(&stream, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        stream.next_out = outBase.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(output.count)
        guard inflate(&stream, Z_FINISH) == Z_STREAM_END else { return nil }
        return output.count - Int(stream.avail_out)
    }

    /// The most bytes `compress` can produce for `count` input bytes.
    static func bound(_ count: Int) -> Int {
        Int(compressBound(uLong(count)))
    }

    /// Compresses `input` into `output` (at least `bound(input.count)` bytes) as one zlib
    /// stream. Returns the compressed length, or nil if zlib fails.
    static func compressStream(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, level: Int32) -> Int? {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else { return nil }
        var length = uLongf(output.count)
        let status = compress2(outBase.assumingMemoryBound(to: Bytef.self), &length,
                               inBase.assumingMemoryBound(to: Bytef.self), uLong(input.count), level)
        return status == Z_OK ? Int(length) : nil
    }
}
