# Writes the seed inputs of every fuzz target into fuzz/corpus/TARGET/: layers (plain, with
# whiteouts and hard links, and hostile ones that try to leave the root through symlinks, .., absolute
# paths and device nodes), docker and OCI archives, manifests with @CONFIG@/@MANIFEST@ placeholders
# (see fuzz_targets/oci_json.rs), imago.toml files. Fuzzing and -merge grow and trim the corpora from
# there. Run: python3 fuzz/seeds.py
import tarfile, io, json, hashlib, os, gzip, re
here=os.path.dirname(os.path.abspath(__file__))
root=os.path.join(here,'corpus')
def d(name):
    p=os.path.join(root,name); os.makedirs(p,exist_ok=True); return p
def tar(entries):
    b=io.BytesIO()
    with tarfile.open(fileobj=b,mode='w',format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            ti=tarfile.TarInfo(e[0]); kind=e[1]
            if kind=='f':
                data=e[2]; ti.size=len(data); ti.mode=e[3] if len(e)>3 else 0o644; t.addfile(ti,io.BytesIO(data))
            elif kind=='d': ti.type=tarfile.DIRTYPE; ti.mode=0o755; t.addfile(ti)
            elif kind=='s': ti.type=tarfile.SYMTYPE; ti.linkname=e[2]; t.addfile(ti)
            elif kind=='h': ti.type=tarfile.LNKTYPE; ti.linkname=e[2]; t.addfile(ti)
            elif kind=='p': ti.type=tarfile.FIFOTYPE; t.addfile(ti)
            elif kind=='c': ti.type=tarfile.CHRTYPE; ti.devmajor=1; ti.devminor=3; t.addfile(ti)
    return b.getvalue()
L=d('layer_unpack')
layers={
 'basic':[('etc/','d'),('etc/passwd','f',b'root:x:0:0::/:/bin/sh\n'),('bin/','d'),('bin/sh','s','busybox'),('bin/busybox','f',b'\x7fELF',0o755),('tmp/','d')],
 'whiteouts':[('lower/','d'),('lower/.wh..wh..opq','f',b''),('lower/.wh.file','f',b''),('lower/new','f',b'hello',0o4755),('lower/new2','h','lower/new'),('lower/sym','s','../up')],
 'through-lower-symlinks':[('up/sentinel','f',b'x'),('abs/new','f',b'x'),('lower/up2/new','f',b'x')],
 'own-symlinks':[('esc','s','../outside'),('esc/new','f',b'x')],
 'links':[('hard','h','abs-file'),('hard2','h','up/sentinel'),('f','f',b'x'),('g','h','f')],
 'dotdot':[('../outside/new','f',b'x')],
 'absolute':[('/outside/new','f',b'x')],
 'root-entry':[('./','d'),('./a','f',b'a')],
 'device':[('dev','c')],
 'fifo':[('fifo','p'),('fifo','f',b'x')],
 'kind-change':[('a','f',b'1'),('a/','d')],
 'whiteout-symlink':[('.wh.up','f',b''),('.wh.abs','f',b'')],
 'longname':[('a'*120+'/'+'b'*120,'f',b'x')],
}
for n,e in layers.items(): open(os.path.join(L,n+'.tar'),'wb').write(tar(e))
open(os.path.join(L,'basic.tar.gz'),'wb').write(gzip.compress(tar(layers['basic']),mtime=0))
# docker / oci archives
def sha(b): return 'sha256:'+hashlib.sha256(b).hexdigest()
layer=tar(layers['basic'])
cfg=json.dumps({"architecture":"amd64","os":"linux","created":"2020-01-01T00:00:00Z","config":{"Env":["PATH=/bin"],"Entrypoint":["/bin/sh"],"ExposedPorts":{"8080/tcp":{}},"Labels":{"a":"b"}},"rootfs":{"type":"layers","diff_ids":[sha(layer)]},"history":[{"created":"2020-01-01T00:00:00.5Z","created_by":"x"}]},separators=(',',':')).encode()
A=d('docker_archive')
def arch(files):
    b=io.BytesIO()
    with tarfile.open(fileobj=b,mode='w',format=tarfile.GNU_FORMAT) as t:
        for name,data in files:
            if data is None:
                ti=tarfile.TarInfo(name); ti.type=tarfile.DIRTYPE; t.addfile(ti); continue
            ti=tarfile.TarInfo(name); ti.size=len(data); t.addfile(ti,io.BytesIO(data))
    return b.getvalue()
lh=hashlib.sha256(layer).hexdigest(); ch=hashlib.sha256(cfg).hexdigest()
man=json.dumps([{"Config":ch+".json","RepoTags":["web:latest"],"Layers":[lh+"/layer.tar"]}]).encode()
open(os.path.join(A,'docker.tar'),'wb').write(arch([(lh+'/',None),(lh+'/layer.tar',layer),(ch+'.json',cfg),('manifest.json',man),('repositories',b'{}')]))
omanifest=json.dumps({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":sha(cfg),"size":len(cfg)},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":sha(layer),"size":len(layer)}]},separators=(',',':')).encode()
index=json.dumps({"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":sha(omanifest),"size":len(omanifest),"annotations":{"org.opencontainers.image.ref.name":"web:v1"}}]}).encode()
def blob(b): return ('blobs/sha256/'+hashlib.sha256(b).hexdigest(), b)
open(os.path.join(A,'oci.tar'),'wb').write(arch([('oci-layout',b'{"imageLayoutVersion":"1.0.0"}'),('index.json',index),blob(cfg),blob(layer),blob(omanifest)]))
open(os.path.join(A,'oci.tar.gz'),'wb').write(gzip.compress(arch([('oci-layout',b'{"imageLayoutVersion":"1.0.0"}'),('index.json',index),blob(cfg),blob(layer),blob(omanifest)]),mtime=0))
# oci_json
J=d('oci_json')
m=omanifest.decode().replace(sha(cfg),'@CONFIG@').replace('"size":%d'%len(cfg),'"size":@CONFIG_SIZE@',1)
idx='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@MANIFEST@","size":@MANIFEST_SIZE@,"platform":{"architecture":"amd64","os":"linux"}}]}'
storeidx='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":12,"annotations":{"org.opencontainers.image.ref.name":"fuzz:latest"}}]}'%('a'*64)
open(os.path.join(J,'manifest'),'wb').write(cfg+b'\n----\n'+m.encode())
open(os.path.join(J,'index'),'wb').write(cfg+b'\n----\n'+m.encode()+b'\n----\n'+idx.encode()+b'\n----\n'+storeidx.encode())
dm=m.replace('application/vnd.oci.image.manifest.v1+json','application/vnd.docker.distribution.manifest.v2+json').replace('application/vnd.oci.image.config.v1+json','application/vnd.docker.container.image.v1+json')
open(os.path.join(J,'docker-manifest'),'wb').write(cfg+b'\n----\n'+dm.encode())
# imago_toml
T=d('imago_toml')
import shutil
shutil.copy(os.path.join(here,'../examples/web/imago.toml'),os.path.join(T,'example-web.toml'))
doc=open(os.path.join(here,'../docs/imago-toml.md')).read()
for i,blk in enumerate(re.findall(r'```toml\n(.*?)```',doc,re.S)):
    open(os.path.join(T,'docs-%d.toml'%i),'w').write(blk)
open(os.path.join(T,'seed.toml'),'w').write('''[image.base]
compression = "zstd"
[[image.base.layer]]
name = "etc"
dir = [{ path = "/tmp", mode = "1777" }]
file = [{ path = "/etc/passwd", content = "root:x:0:0:root:/root:/bin/sh\\n", owner = "0:0", mode = "0644" }]
symlink = [{ path = "/bin/sh", target = "busybox" }]
[image.base.config]
entrypoint = ["/bin/sh"]
env = ["PATH=/bin"]
ports = ["8080/tcp"]

[image.web]
from = "base"
[[image.web.layer]]
copy = [{ src = "sub", dest = "/www/", mode = "0644", dir_mode = "0755" }, { src = "*.txt", dest = "/txt/" }, { src = "link", dest = "/l" }]
file = [{ path = "/www/../x", content = "" }]
[image.web.config]
user = "65534:65534"
workdir = "/www"
stop_signal = "SIGTERM"
labels = { "a" = "b" }
volumes = ["/data"]
annotations = { "x" = "y" }
''')
# service_file: whole imago.toml files with [service.*] tables (the example, the docs' and the
# README's, the tests'), every field of a service, and files each check refuses.
S=d('service_file')
shutil.copy(os.path.join(here,'../examples/web/imago.toml'),os.path.join(S,'example-web.toml'))
for src in ('../docs/imago-toml.md','../README.md'):
    for i,blk in enumerate(re.findall(r'```toml\n(.*?)```',open(os.path.join(here,src)).read(),re.S)):
        if '[service.' in blk:
            open(os.path.join(S,'%s-%d.toml'%(os.path.basename(src)[:-3].lower(),i)),'w').write(blk)
services={
'all-fields':'''[image.web]
from = "scratch"

[service.web]
image = "web"
replicas = 4
command = ["/bin/httpd", "-f", "-p", "8080"]
env = { MODE = "prod", EMPTY = "" }
port = 8088
target_port = 8080
network = "private"
volumes = ["data:/srv/data", "/etc/hosts:/etc/hosts:ro", "cache:/var/cache/:rw"]
seccomp = "default"
stop_grace_period = "1m 30s"

[service.web.resources]
memory = "64M"
cpus = 0.5
pids = 64

[service.web.health]
type = "http"
path = "/up"
status = 204
port = 8080
interval = "500ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 3
start_period = "2s"

[service.web.rollout]
strategy = "blue-green"
max_surge = "50%"
max_unavailable = "25%"
min_ready = "3s"
progress_deadline = "2m"
auto_rollback = false
drain = "250ms"
''',
'probes':'''[service.tcp]
image = "api:v1"
target_port = 9000
health = { type = "tcp" }

[service.cmd]
image = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
network = "host"
seccomp = "unconfined"
health = { type = "command", command = ["/bin/true"], interval = "2s" }
rollout = { max_surge = 0, max_unavailable = 1 }
''',
'inline-seccomp':'''[service.locked]
image = "web"
seccomp = { profile = { defaultAction = "SCMP_ACT_ERRNO", defaultErrnoRet = 1, architectures = ["SCMP_ARCH_X86_64"], syscalls = [{ names = ["read", "write", "exit_group"], action = "SCMP_ACT_ALLOW" }, { names = ["personality"], action = "SCMP_ACT_ALLOW", args = [{ index = 0, value = 8, valueTwo = 0, op = "SCMP_CMP_EQ" }] }] } }
''',
'profile-file':'''[service.web]
image = "web"
seccomp = "profiles/strict.json"
''',
'only-builder':'''[image.web]
from = "scratch"
''',
'typo':'''[service.web]
image = "web"
replica = 2
''',
'bad-type':'''[service.web]
image = "web"
replicas = "two"
''',
'port-conflict':'''[service.a]
image = "web"
port = 8080

[service.b]
image = "api"
port = 8080
''',
'stuck-rollout':'''[service.web]
image = "web"
replicas = 0
rollout = { max_surge = 0, max_unavailable = "0%", progress_deadline = "0s" }
''',
'bad-values':'''[service.web]
image = " "
volumes = ["data:srv", "/a/../b:/x", "v:/proc/x", "a:b:c:d"]
resources = { cpus = -1.0, memory = "lots" }
health = { type = "http", path = "/", command = ["x"], interval = "soon" }
''',
}
for n,t in services.items(): open(os.path.join(S,n+'.toml'),'w').write(t)
