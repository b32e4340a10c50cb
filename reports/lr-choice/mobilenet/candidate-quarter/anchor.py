import json, numpy as np, sys, os, csv
sys.path.insert(0,'/work/main'); os.chdir('/work/main')
from pathlib import Path
from onecycle.commands import lrbench_spec, lrbench_report, lrbench_score as S
from onecycle.range_test import curves
scs=[lrbench_spec.load(Path(f'studies/lr-choice/{n}.yaml')) for n in ['quick','finetune','small','mobilenet','width64']]
found=lrbench_report.collect(scs)
def anchor(lrs, sm, stop, frac):
    n=len(sm); st=n//10
    lr=np.array(lrs[st:]); l=np.array(sm[st:])
    low=int(np.argmin(l)); level=l[low]+frac*(l[0]-l[low])
    above=np.flatnonzero(l[low:]>level)
    if len(above): return lr[low+above[0]]
    return lr[-1] if stop!="completed" else None
def rule(k, frac):
    def pick(lrs, losses, val, stop="completed"):
        rd=curves.Sweep(lrs,losses,stop=stop).reread('centered',0.2,S.STOP)
        m=curves.suggest_min(rd.lrs,rd.smooth)
        b=anchor(rd.lrs, rd.smooth, rd.stop, frac)
        return m if b is None else min(m,b/k)
    return pick
rows=list(csv.DictReader(open('/tmp/ana/s1curve.csv')))
s1=[]
for sd in sorted({r['seed'] for r in rows}):
    rr=[r for r in rows if r['seed']==sd]
    s1.append(([float(r['lr']) for r in rr],[float(r['loss']) for r in rr]))
for frac in (1.0, 0.5, 0.25):
  for k in (3,4,6,8,10,12):
    fn=rule(k,frac); out=[]
    for name,(curve,sweeps,n) in found.items():
        L=max(s['num_iter'] for s in sweeps)
        ch=sorted((s for s in sweeps if s['num_iter']==L), key=lambda s:s['seed'])
        p=[fn(s['lrs'],s['losses'],s['val_losses'],s.get('stop','completed')) for s in ch]
        g=[float(np.median(p[i:i+3])) for i in range(0,len(p)-2,3)]
        sc=S.score_rule(curve,g); out.append(f"{name[:5]} {sc['regret_mean']:.2f} {sc['spread']:.1f}x")
    ps1=[fn(l,x,[], "diverged") for l,x in s1]
    print(f"frac {frac} k {k}: "+" | ".join(out)+f" || s1 run picks {[round(x,3) for x in ps1]} median {np.median(ps1):.3f}")
print("--- the confirm runs' own sweeps")
for f in ("s0","s1curve","s2"):
    rows=list(csv.DictReader(open(f'/tmp/ana/{f}.csv')))
    sw=[]
    for sd in sorted({r['seed'] for r in rows}):
        rr=[r for r in rows if r['seed']==sd]; sw.append(([float(r['lr']) for r in rr],[float(r['loss']) for r in rr]))
    for frac,k in ((1.0,12),(0.25,4),(0.5,6)):
        ps=[rule(k,frac)(l,x,[],"diverged") for l,x in sw]
        print(f, frac, k, [round(float(p),3) for p in ps], round(float(np.median(ps)),3))
