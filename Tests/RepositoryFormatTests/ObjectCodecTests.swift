import CairnCore
import Testing
@testable import RepositoryFormat

private func pseudoRandom(_ n: Int, seed: UInt64) -> [UInt8] {
    var s = seed
    return (0..<n).map { _ in
        s = s &* 6364136223846793005 &+ 1442695040888963407
        return UInt8(truncatingIfNeeded: s >> 33)
    }
}

@Suite struct ObjectCodecTests {
    static let keys = MasterKeys.generate()

    @Test(arguments: [true, false])
    func roundTripCompressibleAndIncompressible(encrypted: Bool) throws {
        let codec = ObjectCodec(keys: encrypted ? Self.keys : nil, compressionLevel: 3)
        for plain in [Array(repeating: UInt8(ascii: "a"), count: 100_000), pseudoRandom(70_000, seed: 1), [UInt8]()] {
            let id = codec.id(of: plain)
            let sealed = try codec.seal(kind: .chunk, id: id, plaintext: plain)
            #expect(Array(sealed[0..<4]) == Array("CRNO".utf8))
            // Incompressible data is kept raw (compression byte 0), compressible data is zstd.
            if plain.count == 100_000 { #expect(sealed[6] == 1); #expect(sealed.count < 1000) }
            if plain.count == 70_000 { #expect(sealed[6] == 0) }
            #expect(sealed[7] == (encrypted ? 1 : 0))
            let opened = try codec.open(kind: .chunk, id: id, object: sealed)
            #expect(opened == plain)
        }
    }

    @Test func idIsKeyedWhenEncrypted() {
        let plain = pseudoRandom(1000, seed: 2)
        let a = ObjectCodec(keys: Self.keys, compressionLevel: 3).id(of: plain)
        let b = ObjectCodec(keys: MasterKeys.generate(), compressionLevel: 3).id(of: plain)
        let c = ObjectCodec(keys: nil, compressionLevel: 3).id(of: plain)
        #expect(a != b)
        #expect(a != c)
        // Unencrypted ids are plain SHA-256 (known vector for "abc").
        let abc = ObjectCodec(keys: nil, compressionLevel: 3).id(of: Array("abc".utf8))
        #expect(abc.hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test func chunkCannotBeOpenedAsManifest() throws {
        let codec = ObjectCodec(keys: Self.keys, compressionLevel: 3)
        let plain = Array("{\"version\":1}".utf8)
        let id = codec.id(of: plain)
        let sealed = try codec.seal(kind: .chunk, id: id, plaintext: plain)
        #expect(throws: CairnError.self) { try codec.open(kind: .manifest, id: id, object: sealed) }
        // Rewriting the kind byte does not help: the header is authenticated.
        var forged = sealed
        forged[5] = ObjectKind.manifest.rawValue
        let e = #expect(throws: CairnError.self) { try codec.open(kind: .manifest, id: id, object: forged) }
        #expect(e?.code == .corrupt)
    }

    @Test(arguments: [true, false])
    func everyFlippedByteIsDetected(encrypted: Bool) throws {
        let codec = ObjectCodec(keys: encrypted ? Self.keys : nil, compressionLevel: 3)
        let plain = Array(String(repeating: "cairn chunk ", count: 50).utf8) + pseudoRandom(300, seed: 3)
        let id = codec.id(of: plain)
        let sealed = try codec.seal(kind: .chunk, id: id, plaintext: plain)
        var unnoticed = 0
        for i in sealed.indices {
            var bad = sealed
            bad[i] ^= 0x01
            // A flip must never yield different data. Encrypted objects are authenticated byte
            // for byte; unencrypted ones are checked on their plaintext, so a flip in bits the
            // zstd decoder ignores may decode to the very same bytes (harmless, and counted).
            do {
                let opened = try codec.open(kind: .chunk, id: id, object: bad)
                #expect(opened == plain, "flip at byte \(i) produced different data without an error")
                #expect(!encrypted, "flip at byte \(i) of an encrypted object went unnoticed")
                unnoticed += 1
            } catch is CairnError {
            }
        }
        #expect(unnoticed <= 2, "\(unnoticed) flips decoded to the same plaintext")
        for n in [0, 10, 31, 32, sealed.count - 1] {
            #expect(throws: CairnError.self) { try codec.open(kind: .chunk, id: id, object: Array(sealed.prefix(n))) }
        }
        // Stored under another name: refused.
        let other = codec.id(of: [1, 2, 3])
        #expect(throws: CairnError.self) { try codec.open(kind: .chunk, id: other, object: sealed) }
    }

    @Test func unencryptedObjectRefusedInEncryptedRepository() throws {
        let plain = pseudoRandom(500, seed: 4)
        let clear = ObjectCodec(keys: nil, compressionLevel: 3)
        let sealed = try clear.seal(kind: .chunk, id: clear.id(of: plain), plaintext: plain)
        let enc = ObjectCodec(keys: Self.keys, compressionLevel: 3)
        let e = #expect(throws: CairnError.self) { try enc.open(kind: .chunk, id: enc.id(of: plain), object: sealed) }
        #expect(e?.message.contains("not encrypted") == true)
    }

    @Test func wrongKeyFailsAuthentication() throws {
        let plain = pseudoRandom(500, seed: 5)
        let a = ObjectCodec(keys: Self.keys, compressionLevel: 3)
        let id = a.id(of: plain)
        let sealed = try a.seal(kind: .index, id: id, plaintext: plain)
        let b = ObjectCodec(keys: MasterKeys.generate(), compressionLevel: 3)
        #expect(throws: CairnError.self) { try b.open(kind: .index, id: id, object: sealed) }
    }
}

@Suite struct DiskIndexTests {
    @Test func roundTrip() throws {
        var entries: [CairnCore.Digest] = []
        for i in 0..<5 { entries.append(i == 2 ? .zero : ObjectCodec(keys: nil, compressionLevel: 1).id(of: [UInt8(i)])) }
        let idx = DiskIndex(virtualSize: 4 * 65536 + 100, chunkSize: 65536, entries: entries)
        let bytes = idx.encode()
        #expect(bytes.count == 64 + 5 * 32)
        #expect(try DiskIndex.decode(bytes, what: "t") == idx)
        #expect(idx.length(ofChunk: 4) == 100)
        #expect(idx.length(ofChunk: 0) == 65536)
    }

    @Test func malformedIndexesAreRejected() {
        let idx = DiskIndex(virtualSize: 3 * 65536, chunkSize: 65536, entries: [.zero, .zero, .zero])
        let good = idx.encode()
        var wrongCount = good; wrongCount[32] = 4
        var reserved = good; reserved[50] = 1
        var badChunk = good; badChunk[24] = 3
        var badMagic = good; badMagic[0] = 0
        for (bytes, what) in [(wrongCount, "count"), (reserved, "reserved"), (badChunk, "chunk size"), (badMagic, "magic"),
                              (Array(good.dropLast()), "truncated"), (Array(good.prefix(10)), "short")] {
            #expect(throws: CairnError.self, "\(what)") { try DiskIndex.decode(bytes, what: what) }
        }
    }
}

@Suite struct KeyFileTests {
    @Test func unlockWithRightAndWrongPassword() throws {
        let keys = MasterKeys.generate()
        let kf = try KeyFile.create(keys: keys, passphrase: "correct horse", n: 1024, host: "h", created: "now")
        let back = try kf.unlock(passphrase: "correct horse")
        #expect(back.material == keys.material)
        let e = #expect(throws: CairnError.self) { try kf.unlock(passphrase: "wrong") }
        #expect(e?.code == .wrongPassword)
    }

    @Test func absurdScryptParametersAreRefused() throws {
        var kf = try KeyFile.create(keys: .generate(), passphrase: "p", n: 1024, host: "h", created: "now")
        kf.n = 1 << 30
        let e = #expect(throws: CairnError.self) { try kf.unlock(passphrase: "p") }
        #expect(e?.code == .corrupt)
    }
}

@Suite struct ManifestTests {
    @Test func roundTripAndVersionCheck() throws {
        let m = Manifest(vm: "web01", time: "2026-01-01T00:00:00.000Z", host: "h", tags: ["a"], toolVersion: "cairn test",
                         chunkSize: 1 << 20, disks: [.init(name: "d", virtualSize: 10, sourceFormat: "raw", sourcePath: "/x", index: "00",
                                                           chunks: 1, bytesRead: 1, bytesNew: 1, bytesDeduplicated: 0, bytesZero: 0, bytesStored: 1)])
        #expect(try Manifest.decode(try m.encode(), what: "m") == m)
        var v2 = m; v2.version = 2
        #expect(throws: CairnError.self) { try Manifest.decode(try v2.encode(), what: "m") }
        #expect(throws: CairnError.self) { try Manifest.decode(Array("not json".utf8), what: "m") }
    }
}
