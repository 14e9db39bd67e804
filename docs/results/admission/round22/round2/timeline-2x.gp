set terminal pngcairo noenhanced size 900,920
set output 'build/admexp/r22/round2/out/timeline-2x.png'
set multiplot layout 4,1
set key outside right
set xlabel 'time (s)'
set ylabel 'req/s'
set title 'burst at 2x capacity'
plot 'build/admexp/r22/round2/out/timeline-2x-burst.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
set title 'none at 2x capacity'
plot 'build/admexp/r22/round2/out/timeline-2x-none.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
set title 'token_bucket at 2x capacity'
plot 'build/admexp/r22/round2/out/timeline-2x-token_bucket.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
set title 'queue_threshold at 2x capacity'
plot 'build/admexp/r22/round2/out/timeline-2x-queue_threshold.dat' u 1:5 w steps lw 2 t 'goodput', '' u 1:2 w l t 'admitted', '' u 1:3 w l t 'held', '' u 1:4 w l t 'rejected'
unset multiplot
