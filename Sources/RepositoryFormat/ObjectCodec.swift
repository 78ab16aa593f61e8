import Crypto
import CZstd
import CairnCore
import Foundation

/// Seals and opens repository objects (the envelope of docs/FORMAT.md, "Objects").
///
/// One codec per worker thread: it owns its zstd contexts and scratch buffers and reuses them
/// for every chunk, so the hot path allocates nothing per chunk except what swift-crypto's
/// AES-GCM returns. Not thread-safe; cheap to create.
///
/// Layout (32-byte header, all integers little-endian):
///
///     0  4  magic "CRNO"        4  1  version (1)     5  1  kind
///     6  1  compression         7  1  encryption
///     8  8  plaintext length    16 8  payload length  24 8  reserved (0)
///     32 .. payload: stored bytes, or nonce(12) || ciphertext || tag(16)
///
/// Associated data of AES-GCM = the 32 header bytes || the 32-byte object id.
package final class ObjectCodec {
    package let keys: MasterKeys?
    package let level: Int32
    private let cctx: OpaquePointer
    private let dctx: OpaquePointer
    private var scratch: UnsafeMutableRawBufferPointer
    private var output: UnsafeMutableRawBufferPointer

    package init(keys: MasterKeys?, compressionLevel: Int) {
        self.keys = keys
        self.level = Int32(compressionLevel)
        cctx = ZSTD_createCCtx()!
        dctx = ZSTD_createDCtx()!
        ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level)
        ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 0)
        ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1)
        scratch = .allocate(byteCount: 0, alignment: 64)
        output = .allocate(byteCount: 0, alignment: 64)
    }

    deinit {
        ZSTD_freeCCtx(cctx)
        ZSTD_freeDCtx(dctx)
        scratch.deallocate()
        output.deallocate()
    }

    private func ensure(_ buf: inout UnsafeMutableRawBufferPointer, _ n: Int) {
        if buf.count < n {
            buf.deallocate()
            buf = .allocate(byteCount: max(n, 4096), alignment: 64)
        }
    }

    // MARK: ids

    /// The id of an object's plaintext: SHA-256, or HMAC-SHA256 with the id key when encrypted.
    package func id(of plaintext: UnsafeRawBufferPointer) -> Digest {
        if let keys {
            let mac = HMAC<SHA256>.authenticationCode(for: plaintext, using: keys.id)
            return mac.withUnsafeBytes { Digest(bytes: $0) }
        }
        let h = SHA256.hash(data: plaintext)
        return h.withUnsafeBytes { Digest(bytes: $0) }
    }

    package func id(of plaintext: [UInt8]) -> Digest {
        plaintext.withUnsafeBytes { id(of: $0) }
    }

    // MARK: seal

    /// Builds the stored object for `plaintext`. The returned buffer is owned by the codec and
    /// valid until the next call.
    package func seal(kind: ObjectKind, id: Digest, plaintext: UnsafeRawBufferPointer, compress: Bool = true) throws -> UnsafeRawBufferPointer {
        var payload = plaintext
        var compression = CompressionAlgorithm.none
        if compress, plaintext.count > 0 {
            let bound = ZSTD_compressBound(plaintext.count)
            ensure(&scratch, bound)
            let n = ZSTD_compress2(cctx, scratch.baseAddress, bound, plaintext.baseAddress, plaintext.count)
            if ZSTD_isError(n) != 0 {
                throw CairnError(.io, "zstd compression failed: \(String(cString: ZSTD_getErrorName(n)))")
            }
            // Kept raw when compression does not make it smaller.
            if n < plaintext.count {
                payload = UnsafeRawBufferPointer(rebasing: scratch[0..<n])
                compression = .zstd
            }
        }
        let encrypted = keys != nil
        let payloadLength = payload.count + (encrypted ? Magic.nonceSize + Magic.tagSize : 0)
        let total = Magic.objectHeaderSize + payloadLength
        ensure(&output, total)
        let header = UnsafeMutableRawBufferPointer(rebasing: output[0..<Magic.objectHeaderSize])
        header.initializeMemory(as: UInt8.self, repeating: 0)
        for (i, b) in Magic.object.enumerated() { header[i] = b }
        header[4] = Magic.objectVersion
        header[5] = kind.rawValue
        header[6] = compression.rawValue
        header[7] = encrypted ? EncryptionAlgorithm.aes256gcm.rawValue : EncryptionAlgorithm.none.rawValue
        header.putLE(UInt64(plaintext.count), at: 8)
        header.putLE(UInt64(payloadLength), at: 16)

        if let keys {
            let aad = associatedData(header: UnsafeRawBufferPointer(header), id: id)
            let box = try AES.GCM.seal(payload, using: keys.encryption, nonce: AES.GCM.Nonce(), authenticating: aad)
            var o = Magic.objectHeaderSize
            box.nonce.withUnsafeBytes { n in
                UnsafeMutableRawBufferPointer(rebasing: output[o..<o + n.count]).copyMemory(from: n)
                o += n.count
            }
            box.ciphertext.withUnsafeBytes { c in
                UnsafeMutableRawBufferPointer(rebasing: output[o..<o + c.count]).copyMemory(from: c)
                o += c.count
            }
            box.tag.withUnsafeBytes { t in
                UnsafeMutableRawBufferPointer(rebasing: output[o..<o + t.count]).copyMemory(from: t)
                o += t.count
            }
            precondition(o == total)
        } else {
            UnsafeMutableRawBufferPointer(rebasing: output[Magic.objectHeaderSize..<total]).copyMemory(from: payload)
        }
        return UnsafeRawBufferPointer(rebasing: output[0..<total])
    }

    package func seal(kind: ObjectKind, id: Digest, plaintext: [UInt8], compress: Bool = true) throws -> [UInt8] {
        try plaintext.withUnsafeBytes { Array(try seal(kind: kind, id: id, plaintext: $0, compress: compress)) }
    }

    // MARK: open

    /// Checks an object's header in the order docs/FORMAT.md gives (size, magic, version, kind,
    /// compression, encryption, reserved bytes, payload length, plaintext limit) before anything
    /// is allocated from it. Returns the algorithms and the plaintext length.
    private static func checkHeader(kind: ObjectKind, id: Digest, object: UnsafeRawBufferPointer, limit: Int) throws
        -> (compression: CompressionAlgorithm, encryption: EncryptionAlgorithm, plainLength: Int) {
        let what = "\(kind) \(id.hex)"
        guard object.count >= Magic.objectHeaderSize else {
            throw CairnError(.corrupt, "\(what): object is \(object.count) bytes, shorter than its header (truncated)")
        }
        guard object[0] == Magic.object[0], object[1] == Magic.object[1], object[2] == Magic.object[2], object[3] == Magic.object[3] else {
            throw CairnError(.corrupt, "\(what): bad magic (not a Cairn object)")
        }
        guard object[4] == Magic.objectVersion else {
            throw CairnError(.unsupported, "\(what): object version \(object[4]) is not supported")
        }
        guard object[5] == kind.rawValue else {
            let found = ObjectKind(rawValue: object[5]).map { " (\($0))" } ?? ""
            throw CairnError(.corrupt, "\(what): object kind \(object[5])\(found) where \(kind.rawValue) (\(kind)) was expected")
        }
        guard let compression = CompressionAlgorithm(rawValue: object[6]) else {
            throw CairnError(.corrupt, "\(what): unknown compression \(object[6])")
        }
        guard let encryption = EncryptionAlgorithm(rawValue: object[7]) else {
            throw CairnError(.corrupt, "\(what): unknown encryption \(object[7])")
        }
        guard object.le(UInt64.self, at: 24) == 0 else { throw CairnError(.corrupt, "\(what): reserved header bytes are not zero") }
        let plainLength = object.le(UInt64.self, at: 8)
        let payloadLength = object.le(UInt64.self, at: 16)
        guard payloadLength == UInt64(object.count - Magic.objectHeaderSize) else {
            throw CairnError(.corrupt, "\(what): payload length \(payloadLength) but \(object.count - Magic.objectHeaderSize) bytes present (truncated or extended)")
        }
        guard plainLength <= UInt64(limit) else {
            throw CairnError(.corrupt, "\(what): plaintext length \(plainLength) exceeds the expected maximum \(limit)")
        }
        return (compression, encryption, Int(plainLength))
    }

    /// Opens an object into `into` (which must hold at least its plaintext length), checks its
    /// kind, authenticity and that its plaintext hashes to `id`. Returns the plaintext length.
    @discardableResult
    package func open(kind: ObjectKind, id: Digest, object: UnsafeRawBufferPointer, into: UnsafeMutableRawBufferPointer) throws -> Int {
        let what = "\(kind) \(id.hex)"
        let (compression, encryption, plainLength) = try ObjectCodec.checkHeader(kind: kind, id: id, object: object, limit: into.count)
        let plainCount = plainLength
        let header = UnsafeRawBufferPointer(rebasing: object[0..<Magic.objectHeaderSize])

        // Decrypt (or take) the payload.
        var payload = UnsafeRawBufferPointer(rebasing: object[Magic.objectHeaderSize...])
        var decrypted: Data?
        switch (encryption, keys) {
        case (.aes256gcm, let keys?):
            guard payload.count >= Magic.nonceSize + Magic.tagSize else {
                throw CairnError(.corrupt, "\(what): encrypted payload shorter than nonce and tag")
            }
            let aad = associatedData(header: header, id: id)
            do {
                let nonce = try AES.GCM.Nonce(data: UnsafeRawBufferPointer(rebasing: payload[payload.startIndex..<payload.startIndex + Magic.nonceSize]))
                let box = try AES.GCM.SealedBox(
                    nonce: nonce,
                    ciphertext: UnsafeRawBufferPointer(rebasing: payload[(payload.startIndex + Magic.nonceSize)..<(payload.endIndex - Magic.tagSize)]),
                    tag: UnsafeRawBufferPointer(rebasing: payload[(payload.endIndex - Magic.tagSize)...]))
                decrypted = try AES.GCM.open(box, using: keys.encryption, authenticating: aad)
            } catch {
                throw CairnError(.corrupt, "\(what): authentication failed (the object was modified, truncated or stored under another id)")
            }
        case (.aes256gcm, nil):
            throw CairnError(.corrupt, "\(what): object is encrypted but the repository is not")
        case (.none, .some):
            throw CairnError(.corrupt, "\(what): object is not encrypted in an encrypted repository (refusing unauthenticated data)")
        case (.none, nil):
            break
        }

        func finish(_ payload: UnsafeRawBufferPointer) throws -> Int {
            switch compression {
            case .none:
                guard payload.count == plainCount else {
                    throw CairnError(.corrupt, "\(what): stored \(payload.count) bytes where \(plainCount) were recorded")
                }
                if plainCount > 0 { into.baseAddress!.copyMemory(from: payload.baseAddress!, byteCount: plainCount) }
            case .zstd:
                let n = ZSTD_decompressDCtx(dctx, into.baseAddress, plainCount, payload.baseAddress, payload.count)
                if ZSTD_isError(n) != 0 {
                    throw CairnError(.corrupt, "\(what): zstd data is corrupt (\(String(cString: ZSTD_getErrorName(n))))")
                }
                guard n == plainCount else {
                    throw CairnError(.corrupt, "\(what): decompressed to \(n) bytes where \(plainCount) were recorded")
                }
            }
            let actual = self.id(of: UnsafeRawBufferPointer(rebasing: into[0..<plainCount]))
            guard actual == id else {
                throw CairnError(.corrupt, "\(what): content digest is \(actual.hex) (bit rot or tampering)")
            }
            return plainCount
        }
        if let decrypted {
            return try decrypted.withUnsafeBytes { try finish($0) }
        }
        payload = UnsafeRawBufferPointer(rebasing: object[Magic.objectHeaderSize...])
        return try finish(payload)
    }

    /// Opens a whole object into a new array (metadata: indexes, manifests).
    package func open(kind: ObjectKind, id: Digest, object: [UInt8], limit: Int = 1 << 30) throws -> [UInt8] {
        try object.withUnsafeBytes { obj in
            // The whole header is checked before the plaintext buffer is allocated from it.
            let n = try ObjectCodec.checkHeader(kind: kind, id: id, object: obj, limit: limit).plainLength
            var out = [UInt8](repeating: 0, count: n)
            try out.withUnsafeMutableBytes { _ = try open(kind: kind, id: id, object: obj, into: $0) }
            return out
        }
    }

    private func associatedData(header: UnsafeRawBufferPointer, id: Digest) -> [UInt8] {
        var aad = [UInt8](header)
        aad.append(contentsOf: id.bytes)
        return aad
    }
}
